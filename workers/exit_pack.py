"""Exit packs: what calibration trains (exit-head adapters, learned routers, mapped back-fill maps),
as a safetensors file plus a JSON manifest naming the model it belongs to.

Layout of a pack directory:
  manifest.json       {"format": "adept-exit-pack", "version": 1, "model": {"name", "fingerprint"},
                       "exit_points": [...], "router": {"features": [...]}, "training": {...},
                       "evaluation": {...}}
  tensors.safetensors adapter.{d}.weight [H, H] (+ adapter.{d}.bias [H])  residual linear: h + W h + b
                      adapter.{d}.down [r, H], adapter.{d}.up [H, r] (+ bias)  residual low rank
                      router.{d}.w1 [R, F], router.{d}.b1 [R], router.{d}.w2 [1, R], router.{d}.b2 [1]
                      map.{e}.{l}.weight [H, H], map.{e}.{l}.bias [H]  exit depth e -> input of layer l
Depths count decoder layers run (1..num_layers); layer indices count from 0.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

FORMAT = "adept-exit-pack"
VERSION = 1
MANIFEST = "manifest.json"
TENSORS = "tensors.safetensors"


class ExitPackError(ValueError):
    pass


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

    def has_routers(self) -> bool:
        return any(k.startswith("router.") for k in self.tensors)

    def prefixed(self, prefix: str) -> dict[str, torch.Tensor]:
        return {k[len(prefix) :]: v for k, v in self.tensors.items() if k.startswith(prefix)}

    def map_for(self, exit_depth: int, layer: int) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        w = self.tensors.get(f"map.{exit_depth}.{layer}.weight")
        return None if w is None else (w, self.tensors.get(f"map.{exit_depth}.{layer}.bias"))

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
        if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
            raise ExitPackError(f"{path / MANIFEST} is not a version-{VERSION} {FORMAT} manifest")
        made_for = manifest.get("model", {}).get("fingerprint")
        if fingerprint is not None and made_for != fingerprint:
            name = manifest.get("model", {}).get("name", "?")
            raise ExitPackError(
                f"exit pack {path} was made for another model ({name}, fingerprint {made_for}); this model's "
                f"fingerprint is {fingerprint}: calibrate a pack for it with `adept calibrate`"
            )
        return cls(manifest=manifest, tensors=load_file(str(path / TENSORS)))
