"""`adept calibrate`'s work on the serving side: train an exit pack from a corpus (workers/calibration.py
does the training on hidden states), then finish it in a real engine: measure the back-fill harm for its
cost model and tune its default threshold to a target agreement with the full model."""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from serving.config import EngineConfig
from serving.engine import Engine
from serving.evaluation import LEARNED_THRESHOLDS, agreement, backfill_harm, compute_used, costs_of, teacher_forced
from serving.params import ExitParams
from serving.plan import default_exit_points
from workers.arch import ModelArch
from workers.calibration import CalibrationSettings, calibrate, self_generated
from workers.corpus import CorpusPart, chat_prompts, text_windows
from workers.exit_pack import ExitPack
from workers.model_store import load_config, load_tokenizer, resolve_model


@dataclass
class CalibrationJob:
    """What `adept calibrate` was asked for. `settings` are CalibrationSettings' fields; exit points
    default to the engine's default exit points for the model."""

    model: str
    corpus: str
    output: str
    holdout: float = 0.5
    window: int = 256
    prompts: str | None = None
    generate_tokens: int = 128
    exit_points: list[int] | None = None
    router_features: list[str] = field(default_factory=lambda: ["hidden"])
    target_agreement: float = 0.95
    settings: dict = field(default_factory=dict)


def run(job: CalibrationJob, progress: Callable[[str], None]) -> ExitPack:
    """Train the pack, save it to `job.output`, tune it on corpus text training did not read; report."""
    logging.getLogger("workers").setLevel(logging.INFO)
    path = resolve_model(job.model)
    n = ModelArch.from_config(load_config(path)).num_layers
    points = job.exit_points or default_exit_points(n, max(1, n // 4))
    settings = CalibrationSettings(
        exit_points=[d for d in points if d < n], router_features=job.router_features, **job.settings
    )
    ExitParams(backfill=settings.default_backfill)  # refuse a bad default early
    tokenizer = load_tokenizer(path)
    part = CorpusPart.of(job.corpus, (0.0, 1.0 - job.holdout))
    data = {"corpus": part.describe(), "window": job.window}
    windows = text_windows(part, tokenizer, job.window)
    if job.prompts:
        prompts = CorpusPart.of(job.prompts)
        data["prompts"] = prompts.describe() | {"generated_tokens": job.generate_tokens}
        generated = self_generated(path, chat_prompts(prompts), job.generate_tokens, settings.seed)
        windows = itertools.chain(generated, windows)
    pack = calibrate(path, windows, settings, data, model_name=job.model)
    out = pack.save(job.output)
    # The cost model's last parts need the pack in a real engine, on corpus text training did not read.
    unread = itertools.islice(text_windows(part, tokenizer, 256), settings.max_tokens // 256 + 1, None)
    probe = list(itertools.islice(unread, 8)) or list(itertools.islice(text_windows(part, tokenizer, 256), 8))
    engine = EngineConfig(model=job.model, exit_pack=str(out), num_layer_groups=1, max_num_seqs=len(probe),
                          max_model_len=257, min_exit_depth=min(settings.exit_points))  # fmt: skip
    progress(f"measuring back-fill harm and tuning the default threshold on {sum(map(len, probe))} tokens")
    pack = asyncio.run(tune_pack(engine, probe, settings.exit_points, job.target_agreement))
    for line in summary(pack):
        progress(line)
    progress(f"wrote {out} ({sum(f.stat().st_size for f in Path(out).iterdir()) / 1e6:.1f} MB)")
    return pack


async def tune_pack(config: EngineConfig, windows: list[list[int]], depths: list[int], target: float) -> ExitPack:
    """Calibration's last step, in a real engine on text it did not train on: measure the back-fill harm
    (written into the pack's cost model), then tune the pack's default threshold: the lowest (most
    compute saved) at which policy learned, with the pack's default back-fill, keeps `target` agreement."""
    pack = ExitPack.load(config.exit_pack)
    engine = Engine.local(config)
    try:
        harm = await backfill_harm(engine, windows, depths)
    finally:
        await engine.shutdown()
    pack.manifest["router"]["cost"]["harm"] = harm
    pack.save(config.exit_pack)
    engine = Engine.local(config)
    try:
        full = await teacher_forced(engine, windows, {"policy": "none"})
        backfill = pack.defaults["backfill"]
        chosen = {"threshold": 1.0, "agreement": 1.0, "compute_saved": 0.0}
        for t in LEARNED_THRESHOLDS:  # ascending: earliest exits first
            tf = await teacher_forced(engine, windows, {"policy": "learned", "threshold": t, "backfill": backfill})
            a = agreement(tf.predictions, full.predictions)
            if a >= target:
                plan = engine.plan
                layers, _ = compute_used(tf.exit_layers, list(plan.exit_points), plan.num_layers, "learned", backfill,
                                         plan.min_exit_depth, costs_of(engine))  # fmt: skip
                chosen = {"threshold": t, "agreement": round(a, 4), "compute_saved": round(1 - layers, 4)}
                break
    finally:
        await engine.shutdown()
    pack.manifest["defaults"]["threshold"] = chosen["threshold"]
    pack.manifest["evaluation"]["defaults"] = {"target_agreement": target, "tokens": sum(map(len, windows)), **chosen}
    pack.save(config.exit_pack)
    return pack


def summary(pack: ExitPack) -> list[str]:
    """Per exit point what calibration reached, then the tuned default."""
    harm = pack.manifest["router"]["cost"]["harm"]
    lines = []
    for d, figures in sorted(pack.manifest["evaluation"]["validation"].items(), key=lambda item: int(item[0])):
        lines.append(
            f"exit {d:>3}: agreement {figures['agreement_untrained']:.1%} untrained -> "
            f"{figures['agreement_adapted']:.1%} adapted, KL {figures['kl_untrained']:.2f} -> "
            f"{figures['kl_adapted']:.2f}, router AUC {figures['router_auc']:.2f}, back-fill harm "
            f"{harm['decoupled'][d]:.2f} decoupled / {harm['mapped'][d]:.2f} mapped"
        )
    tuned = pack.manifest["evaluation"]["defaults"]
    lines.append(
        f"default: policy learned, threshold {pack.defaults['threshold']}, {pack.defaults['backfill']} back-fill "
        f"({tuned['agreement']:.1%} agreement, {tuned['compute_saved']:.1%} layer compute saved on the probe text)"
    )
    return lines
