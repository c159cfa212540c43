"""Exit packs: what calibration trains (exit-head adapters, learned routers, mapped back-fill maps),
as a safetensors file plus a JSON manifest naming the model it belongs to.

Layout of a pack directory:
  manifest.json       {"format": "adept-exit-pack", "version": 2, "model": {"name", "fingerprint"},
                       "exit_points": [...], "heads": {d: kind}, "prompt_heads": {d: kind},
                       "router": {"features": [...]},
                       "training": {...}, "evaluation": {...}, "defaults": {"policy", "threshold", "backfill"}}
  tensors.safetensors adapter.{d}.weight [H, H] (+ adapter.{d}.bias [H])  residual linear: h + W h + b
                      adapter.{d}.down [r, H], adapter.{d}.up [H, r] (+ bias)  residual low rank
                      + adapter.{d}.w1 [M, H], .b1 [M], .w2 [H, M]  an MLP head (workers.exits.Adapter)
                      no adapter.{d}.*: the identity head (the model's own final norm and LM head)
                      prompt_adapter.{d}.*, prompt_router.{d}.*  the same for prompt tokens (optional:
                          without them prompt tokens take the generated tokens' adapter and router)
                      router.{d}.w1 [R, F], router.{d}.b1 [R], router.{d}.w2 [1, R], router.{d}.b2 [1]
                      map.{e}.{l}.down [r, H], map.{e}.{l}.up [H, r], map.{e}.{l}.bias [H]
                          exit depth e -> predicted input of layer l: h + up(down(h)) + bias
Depths count decoder layers run (1..num_layers); layer indices count from 0. Tensors may be stored in
float16 (the shipped pack is); loading casts them to the serving dtype.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from workers.model_store import fingerprint

FORMAT = "adept-exit-pack"
VERSION = 2
PROMPT_PREFIX = "prompt_"  # of the adapters and routers prompt tokens take (the others: generated tokens')
READS = (1, 2)  # version 1: the same tensors without MLP heads or the manifest's "heads"
MANIFEST = "manifest.json"
TENSORS = "tensors.safetensors"


# Packs shipped with the package, one folder per model name (made by `make pack`).
SHIPPED = Path(__file__).parent / "packs"


class ExitPackError(ValueError):
    pass


def resolve_pack(setting: str | None, model: str) -> Path | None:
    """The exit pack a configuration means: 'auto' (default) the pack shipped for `model` if there is one,
    'none' no pack, anything else a pack directory."""
    if setting in (None, "auto"):  # shipped packs are named after models, never after folders
        shipped = SHIPPED / model
        return shipped if "/" not in model and (shipped / MANIFEST).is_file() else None
    if setting == "none":
        return None
    return Path(setting).expanduser()


def load_pack(setting: str | None, model: str, model_path: Path) -> ExitPack | None:
    """The configured pack for a model, checked against the model's weights."""
    where = resolve_pack(setting, model)
    return None if where is None else ExitPack.load(where, fingerprint(model_path))


@dataclass
class ExitPack:
    manifest: dict
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def exit_points(self) -> list[int]:
        return list(self.manifest.get("exit_points", []))

    @property
    def router_features(self) -> list[str]:
        return list(self.manifest.get("router", {}).get("features", ["hidden"]))

    @property
    def defaults(self) -> dict:
        """The exit controls the pack was tuned for (policy, threshold, backfill): requests' defaults."""
        return dict(self.manifest.get("defaults", {}))

    @property
    def agreement(self) -> dict[int, float]:
        """Per exit point, how often its head predicted full depth's token on the calibration's held-out
        positions (what a speculative draft there is kept with, about)."""
        validation = self.manifest.get("evaluation", {}).get("validation", {})
        found = {int(d): v.get("agreement_adapted") for d, v in validation.items()}
        return {d: a for d, a in sorted(found.items()) if a is not None}

    def has_routers(self) -> bool:
        return any(k.startswith("router.") for k in self.tensors)

    def prefixed(self, prefix: str) -> dict[str, torch.Tensor]:
        return {k[len(prefix) :]: v for k, v in self.tensors.items() if k.startswith(prefix)}

    def map_for(self, exit_depth: int, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """(down, up, bias) of the map from exit depth to the input of `layer`, or None (identity)."""
        t = self.prefixed(f"map.{exit_depth}.{layer}.")
        return None if not t else (t["down"], t["up"], t["bias"])

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        manifest = {"format": FORMAT, "version": VERSION, **self.manifest}
        save_file({k: v.contiguous() for k, v in self.tensors.items()}, str(path / TENSORS))
        (path / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path, fingerprint: str | None = None) -> ExitPack:
        path = Path(path)
        if path.is_file() and path.name == MANIFEST:
            path = path.parent
        if not (path / MANIFEST).is_file() or not (path / TENSORS).is_file():
            raise ExitPackError(f"{path} is not an exit pack: it needs {MANIFEST} and {TENSORS} (adept calibrate)")
        manifest = json.loads((path / MANIFEST).read_text())
        if manifest.get("format") != FORMAT or manifest.get("version") not in READS:
            raise ExitPackError(
                f"{path / MANIFEST} is not an {FORMAT} manifest of version {' or '.join(map(str, READS))}"
            )
        made_for = manifest.get("model", {}).get("fingerprint")
        if fingerprint is not None and made_for != fingerprint:
            name = manifest.get("model", {}).get("name", "?")
            raise ExitPackError(
                f"exit pack {path} was made for another model ({name}, fingerprint {made_for}); this model's "
                f"fingerprint is {fingerprint}: calibrate a pack for it with `adept calibrate`"
            )
        return cls(manifest=manifest, tensors=load_file(str(path / TENSORS)))
