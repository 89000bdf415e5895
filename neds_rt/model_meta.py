"""Metadata that travels inside every exported model file (ONNX ``metadata_props`` / TorchScript extra file).

An export describes itself: bin size, context length, graph kind, unit vocabulary with regions, session,
output channels with units, normalisation and a hash of the weights. The runtime reads it back with
:func:`ModelMeta.from_json` and refuses a file whose metadata are missing or malformed, and a stream whose
units do not match (:meth:`ModelMeta.check_units`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Final

from neds_rt.errors import ModelFileError, StreamError, invalid

META_KEY: Final = "neds_rt"  # ONNX metadata_props key and TorchScript extra-file stem
FORMAT_VERSION: Final = 1
GRAPHS: Final = ("step", "window")


@dataclass(frozen=True)
class OutputChannel:
    label: str  # e.g. "wheel_speed"
    unit: str  # e.g. "rad/s", "probability"


@dataclass
class ModelMeta:
    graph: str  # "step" (one bin in, state carried) or "window" (C bins in)
    mode: str  # "streaming" | "offline"
    bin_size: float  # seconds
    context: int  # C bins of context
    session: str  # eid the unit vocabulary belongs to
    unit_ids: list[int]  # (N,) cluster ids, in input column order
    regions: list[str]  # (N,) Beryl acronym per unit
    outputs: list[OutputChannel]  # decode channels, in output column order
    normalisation: dict[str, float]  # min/max of scaled continuous behaviour
    weights_sha256: str
    n_layers: int
    n_heads: int
    head_dim: int
    format_version: int = FORMAT_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def n_units(self) -> int:
        return len(self.unit_ids)

    @property
    def weights(self) -> str:
        """``float32``, or the quantization scheme of the weights (``int8`` / ``int4``; ``int8`` for files
        written before the scheme was named in ``extra["quantization"]``)."""
        quantization = self.extra.get("quantization")
        return str(quantization.get("scheme", "int8")) if quantization else "float32"

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | None, source: str) -> ModelMeta:
        """Parse and validate; ``source`` (the file) is named in every error."""
        if not text:
            raise invalid(source, f"has no '{META_KEY}' metadata; it was not written by `neds-rt export`",
                          fix="re-export the checkpoint with `neds-rt export`", kind=ModelFileError)
        try:
            raw = json.loads(text)
        except (json.JSONDecodeError, RecursionError) as err:
            raise invalid(source, "metadata is not valid JSON", str(err)[:80],
                          "re-export the model", kind=ModelFileError) from err
        if not isinstance(raw, dict):
            raise invalid(source, "metadata must be a JSON object", type(raw).__name__, kind=ModelFileError)
        names = {f.name for f in fields(cls)}
        required = {f.name for f in fields(cls) if f.name not in ("format_version", "extra")}
        missing = sorted(required - raw.keys())
        if missing:
            raise invalid(source, "metadata lacks required keys", missing, "re-export the model",
                          kind=ModelFileError)
        if raw.get("format_version", FORMAT_VERSION) != FORMAT_VERSION:
            raise invalid(source, f"metadata format_version must be {FORMAT_VERSION}",
                          raw.get("format_version"), "re-export with this neds-rt version",
                          kind=ModelFileError)
        try:
            kwargs = {k: v for k, v in raw.items() if k in names}
            kwargs["outputs"] = [OutputChannel(**o) for o in raw["outputs"]]
            meta = cls(**kwargs)
        except TypeError as err:
            raise invalid(source, "metadata has malformed fields", str(err), kind=ModelFileError) from err
        meta._validate(source)
        return meta

    def _validate(self, source: str) -> None:
        checks = [
            (self.graph in GRAPHS, "graph", f"must be one of {GRAPHS}", self.graph),
            (self.bin_size > 0, "bin_size", "must be > 0", self.bin_size),
            (self.context > 0, "context", "must be > 0", self.context),
            (len(self.unit_ids) > 0, "unit_ids", "must not be empty", len(self.unit_ids)),
            (len(self.regions) == len(self.unit_ids), "regions", "must have one entry per unit",
             (len(self.regions), len(self.unit_ids))),
            (len(set(self.unit_ids)) == len(self.unit_ids), "unit_ids", "must be unique", "duplicates"),
            (len(self.outputs) > 0, "outputs", "must not be empty", len(self.outputs)),
        ]
        for ok, key, rule, value in checks:
            if not ok:
                raise invalid(f"{source} metadata '{key}'", rule, value, "re-export the model",
                              kind=ModelFileError)

    def check_units(self, stream_units: list[int], stream_name: str) -> None:
        """Refuse a stream whose unit ids (in channel order) differ from the model's vocabulary."""
        if list(stream_units) == list(self.unit_ids):
            return
        model, stream = set(self.unit_ids), set(stream_units)
        missing, extra = sorted(model - stream)[:5], sorted(stream - model)[:5]
        if not missing and not extra:
            detail = "same ids in a different order"
        else:
            detail = f"missing from stream {missing}, unknown to model {extra}"
        raise invalid(
            f"stream '{stream_name}' units", f"must equal the model's {self.n_units} units of session "
            f"{self.session} in order", detail, "serve a model exported for this session and probe",
            kind=StreamError,
        )
