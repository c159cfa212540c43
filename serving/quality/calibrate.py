"""`adept calibrate`'s work on the serving side: train an exit pack from a corpus (workers/calibration.py
does the training on hidden states), then finish it in a real engine: measure the back-fill harm for its
cost model and choose its defaults from task quality (held-out perplexity, the free-running perplexity of
chat continuations, classification accuracy for prompt tokens)."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from serving.engine import Engine
from serving.engine.config import EngineConfig
from serving.engine.params import ExitParams
from serving.engine.plan import default_exit_points
from serving.quality import evaluation
from serving.quality.continuations import Traffic, self_generated
from serving.quality.evaluation import Classification, backfill_harm
from workers.arch import ModelArch
from workers.calibration import CalibrationSettings, Window, calibrate
from workers.corpus import CorpusPart, chat_prompts, labelled_texts, text_windows
from workers.exit_pack import ExitPack
from workers.model_store import load_config, load_tokenizer, resolve_model


@dataclass(frozen=True)
class TuneTargets:
    """What the pack's defaults must keep against full depth, on data calibration did not train on."""

    max_perplexity_increase: float = 0.05  # held-out text, teacher-forced
    # the full model's perplexity of greedy chat continuations: full depth's own score 1.7-2.1, so +5% would
    # forbid almost any changed token
    max_free_running_increase: float = 0.15
    max_accuracy_drop: float = 0.01  # labelled classification, for the prompt tokens' defaults
    agreement: float | None = None  # teacher-forced agreement with the full model, if asked
    # A default exit must save at least this much of its phase's layer compute, or it runs at full depth:
    # below it the exit decisions and back-fill cost more than the layers saved (benchmarks/chat_speed.py
    # here: 5.8% of decode compute saved ran at 0.92x full depth's tokens per second).
    min_compute_saved: float = 0.12

    def pays(self, saved: float) -> bool:
        return saved > 0 and saved >= self.min_compute_saved


@dataclass
class CalibrationJob:
    """What `adept calibrate` was asked for. `settings` are CalibrationSettings' fields; exit points
    default to the engine's default exit points for the model. Training data: `prompts_part` of `prompts`
    (chat prompts) with the model's own continuations (`traffic`), then the corpus less its `holdout`.
    `retune` skips training: it tunes the defaults of the pack already at `output`. Tuning data: held-out
    corpus text (without a corpus: the greedy continuations of the prompts), then the first half of
    `tune_chats` (chat prompts) and of `labelled` (texts in `template`, labels indexing `choices`)."""

    model: str
    corpus: str | None
    output: str
    holdout: float = 0.5
    window: int = 256
    prompts: str | None = None
    prompts_part: tuple[float, float] = (0.0, 0.5)  # the rest is left for adept eval's report
    traffic: Traffic = field(default_factory=Traffic)
    exit_points: list[int] | None = None
    router_features: list[str] = field(default_factory=lambda: ["hidden"])
    settings: dict = field(default_factory=dict)
    retune: bool = False
    tune_chats: str | None = None
    chat_tokens: int = 64
    max_chats: int = 24
    labelled: str | None = None
    template: str = "{text}"
    choices: list[str] = field(default_factory=list)
    targets: TuneTargets = field(default_factory=TuneTargets)


@dataclass
class TuneData:
    windows: list[list[int]]  # held-out text
    chats: list[list[dict[str, str]]]  # chat prompts for free-running quality
    chat_tokens: int
    task: Classification | None  # labelled classification for the prompt tokens' defaults


def run(job: CalibrationJob, progress: Callable[[str], None]) -> ExitPack:
    """Train the pack (unless re-tuning), save it to `job.output`, tune its defaults on data training did not
    read; report."""
    logging.getLogger("workers").setLevel(logging.INFO)
    path = resolve_model(job.model)
    arch = ModelArch.from_config(load_config(path))
    n = arch.num_layers
    points = job.exit_points or default_exit_points(n, max(1, n // 4))
    settings = CalibrationSettings(
        exit_points=[d for d in points if d < n], router_features=job.router_features, **job.settings
    )
    ExitParams(backfill=settings.default_backfill)  # refuse a bad default early
    tokenizer = load_tokenizer(path)
    if job.corpus is None and job.prompts is None:
        raise ValueError("give --corpus (text), --prompts (chat prompts the model continues) or both")
    part = CorpusPart.of(job.corpus, (0.0, 1.0 - job.holdout)) if job.corpus else None
    data: dict = {"window": job.window} | ({"corpus": part.describe()} if part else {})
    prompts = CorpusPart.of(job.prompts, job.prompts_part) if job.prompts else None
    chats = list(chat_prompts(prompts)) if prompts else []
    generated, greedy = [], []  # the model's own continuations of the prompts; the greedy ones come first
    if chats and not job.retune:
        generated, described = self_generated(job.model, chats, job.traffic, progress)
        data["prompts"] = prompts.describe() | described
        greedy = [w.ids for w in generated[: described["prompts_used"]]]
    task = None
    if job.labelled:
        rows = labelled_texts(CorpusPart.of(job.labelled, (0.0, 0.5)))
        task = Classification.of(tokenizer, rows, job.template, job.choices)
    if job.retune:  # the pack's own exit points, and the text it read, skipped below
        out = Path(job.output)
        trained = ExitPack.load(out).manifest
        settings.exit_points = [d for d in trained["exit_points"] if d < n]
        settings.max_tokens = trained["training"]["settings"]["max_tokens"]
    else:
        text = (Window(ids) for ids in text_windows(part, tokenizer, job.window)) if part else ()
        # classification prompts train the prompt tokens' heads (every position of theirs is a prompt's)
        labelled = [Window(ids, len(ids)) for ids in task.prompts] if task and settings.prompt_heads else []
        if labelled:
            data["labelled"] = {"path": job.labelled, "prompts": len(labelled), "template": job.template}
        windows = itertools.chain(generated, labelled, text)
        pack = calibrate(path, windows, settings, data, model_name=job.model)
        out = pack.save(job.output)
    # The cost model's last parts and the defaults need the pack in a real engine, on data training did not
    # read: held-out text; without a corpus, the prompts' greedy continuations.
    if part is not None:
        unread = itertools.islice(text_windows(part, tokenizer, 256), settings.max_tokens // 256 + 1, None)
        probe = list(itertools.islice(unread, 8)) or list(itertools.islice(text_windows(part, tokenizer, 256), 8))
    else:
        if not greedy:  # re-tuning without a corpus
            generated, _ = self_generated(job.model, chats, dataclasses.replace(job.traffic, samples=0), progress)
            greedy = [w.ids for w in generated]
        probe = [w for w in greedy if len(w) < 1024][:8]  # the tuning engine's context below
    tune_chats = [] if job.tune_chats is None else list(
        itertools.islice(chat_prompts(CorpusPart.of(job.tune_chats, (0.0, 0.5))), job.max_chats)
    )  # fmt: skip
    tune = TuneData(probe, tune_chats, job.chat_tokens, task)
    engine = EngineConfig(
        model=job.model, exit_pack=str(out), num_layer_groups=1, max_model_len=min(1024, arch.max_position_embeddings),
        max_num_seqs=max(len(probe), len(tune_chats), 32), min_exit_depth=min(settings.exit_points),
    )  # fmt: skip
    pack = asyncio.run(tune_pack(engine, tune, settings.exit_points, job.targets, progress))
    for line in summary(pack):
        progress(line)
    progress(f"wrote {out} ({sum(f.stat().st_size for f in Path(out).iterdir()) / 1e6:.1f} MB)")
    return pack


async def tune_pack(
    config: EngineConfig,
    data: TuneData,
    depths: list[int],
    targets: TuneTargets,
    progress: Callable[[str], None] = lambda _: None,
) -> ExitPack:
    """Calibration's last step, in a real engine on data it did not train on: measure the back-fill harm
    (written into the pack's cost model), then choose the pack's defaults. Prompt tokens (with labelled
    data): the exit setting that saves the most prompt compute within `max_accuracy_drop` of full depth's
    accuracy and the perplexity targets (prompt tokens' own log-probabilities are what echo scoring, as
    lm-evaluation-harness does it, reads). Generated tokens: the lowest threshold (most compute saved) at
    which policy learned, with the pack's default back-fill, keeps held-out perplexity, the free-running
    perplexity of chat continuations and (if asked) agreement within the targets."""
    pack = ExitPack.load(config.exit_pack)
    pack.manifest["defaults"].pop("prefill", None)  # tuning must not run under the defaults it replaces
    pack.save(config.exit_pack)
    engine = Engine.local(config)
    try:
        progress(f"measuring back-fill harm on {sum(map(len, data.windows))} held-out tokens")
        harm = await backfill_harm(engine, data.windows, depths)
    finally:
        await engine.shutdown()
    pack.manifest["router"]["cost"]["harm"] = harm
    pack.save(config.exit_pack)
    engine = Engine.local(config)
    try:
        prefill, backfill = None, pack.defaults["backfill"]
        held_out = await _HeldOut.of(engine, data.windows)
        quality = await _FreeRunning.of(engine, data) if data.chats else None
        if data.task is not None:
            prefill, pack.manifest["evaluation"]["prefill"] = await _tune_prefill(
                engine, data.task, held_out, quality, depths, backfill, targets, progress
            )
            # No prompt-token exit kept the targets (or saved enough): prompt tokens run at full depth rather
            # than inherit the generated tokens' default, which the prompt targets never judged.
            prefill = prefill or {"policy": "none"}
        chosen = await _tune_decode(engine, held_out, quality, backfill, prefill, targets, progress)
    finally:
        await engine.shutdown()
    pack.manifest["defaults"]["threshold"] = chosen["threshold"]
    # Where no threshold saves enough within the targets, generated tokens run at full depth by default
    # (the router's decisions would cost more than they save); the threshold stays for requests that ask.
    pack.manifest["defaults"]["policy"] = "learned" if targets.pays(chosen["compute_saved"]) else "none"
    if prefill is not None:
        pack.manifest["defaults"]["prefill"] = prefill
    pack.manifest["evaluation"]["defaults"] = {"targets": asdict(targets), "tokens": sum(map(len, data.windows)),
                                               "chat_prompts": len(data.chats), **chosen}  # fmt: skip
    pack.save(config.exit_pack)
    return pack


async def _tune_prefill(
    engine: Engine, task: Classification, held_out: _HeldOut, quality: _FreeRunning | None, depths: list[int],
    backfill: str, targets: TuneTargets, progress: Callable[[str], None],
) -> tuple[dict | None, dict]:  # fmt: skip
    """The prompt tokens' default: of static exits at each exit point (decoupled and mapped back-fill) and
    the router at a few thresholds, the last prompt position at full depth (it samples the first token),
    the one that saves the most prompt compute within the accuracy target, within the perplexity target
    on held-out text (scored at each position's exit) and, with chat prompts, within the free-running
    target (prompt exits change what is generated after them)."""
    full = await evaluation.classify(engine, task, {"policy": "none"})
    candidates = [{"policy": "static", "max_depth": d, "backfill": b} for d in depths for b in ("decoupled", "mapped")]
    candidates += [{"policy": "learned", "threshold": t, "backfill": backfill} for t in (0.3, 0.4, 0.45, 0.5)]
    passed = []
    for c in candidates:
        _, ppl = await held_out.measure(c, as_prompt=True)  # the prompt tokens' heads and routers
        got = {"perplexity": round(ppl, 3), "perplexity_full": round(held_out.perplexity, 3)}
        if ppl <= held_out.perplexity * (1 + targets.max_perplexity_increase):
            c = c | {"full_depth_last": 1}
            got |= await evaluation.classify(engine, task, {"policy": "none", "prefill": c})
            kept = got["accuracy"] >= full["accuracy"] - targets.max_accuracy_drop
            if kept and targets.pays(got["prompt_compute_saved"]):
                passed.append((c, got))
        progress(f"prompt tokens {c}: {', '.join(f'{k} {v}' for k, v in got.items())} "
                 f"(full depth: accuracy {full['accuracy']})")  # fmt: skip
    figures = {"accuracy_full": full["accuracy"], "texts": len(task.labels)}
    for c, got in sorted(passed, key=lambda p: -p[1]["prompt_compute_saved"]):
        if quality is not None:
            fr = await quality.perplexity({"policy": "none", "prefill": c})
            progress(f"prompt tokens {c}: free-running perplexity {fr:.2f} (full depth {quality.full:.2f})")
            got = got | {
                "free_running_perplexity": round(fr, 3),
                "free_running_perplexity_full": round(quality.full, 3),
            }
            if fr > quality.full * (1 + targets.max_free_running_increase):
                continue
        return c, figures | got
    return None, figures


@dataclass
class _HeldOut:
    """Held-out text teacher-forced; full depth's perplexity is the reference."""

    engine: Engine
    windows: list[list[int]]
    full: evaluation.TeacherForced
    perplexity: float

    @classmethod
    async def of(cls, engine: Engine, windows: list[list[int]]) -> _HeldOut:
        full = await evaluation.teacher_forced(engine, windows, {"policy": "none"})
        return cls(engine, windows, full, math.exp(-float(full.target_logprobs.mean())))

    async def measure(self, exit: dict, as_prompt: bool = False) -> tuple[evaluation.TeacherForced, float]:
        tf = await evaluation.teacher_forced(self.engine, self.windows, exit, as_prompt=as_prompt)
        return tf, math.exp(-float(tf.target_logprobs.mean()))


@dataclass
class _FreeRunning:
    """Greedy continuations of chat prompts, scored by the full model; full depth's own are the reference."""

    engine: Engine
    chats: list[list[int]]
    tokens: int
    full: float = 0.0

    @classmethod
    async def of(cls, engine: Engine, data: TuneData) -> _FreeRunning:
        room = engine.config.max_model_len - data.chat_tokens
        q = cls(engine, [c for c in map(engine.chat_prompt, data.chats) if len(c) < room], data.chat_tokens)
        q.full = await q.perplexity({"policy": "none"})
        return q

    async def perplexity(self, exit: dict) -> float:
        out = await evaluation.generate_greedy(self.engine, self.chats, self.tokens, exit)
        return await evaluation.continuation_perplexity(self.engine, self.chats, out)


async def _tune_decode(
    engine: Engine, held_out: _HeldOut, quality: _FreeRunning | None, backfill: str, prefill: dict | None,
    targets: TuneTargets, progress: Callable[[str], None],
) -> dict:  # fmt: skip
    plan = engine.plan
    for t in evaluation.LEARNED_THRESHOLDS:  # ascending: earliest exits first
        exit = {"policy": "learned", "threshold": t, "backfill": backfill}
        tf, ppl = await held_out.measure(exit)
        a = evaluation.agreement(tf.predictions, held_out.full.predictions)
        figures = {"threshold": t, "agreement": round(a, 4), "perplexity": round(ppl, 3),
                   "perplexity_full": round(held_out.perplexity, 3)}  # fmt: skip
        if targets.agreement is not None and a < targets.agreement:
            continue
        if ppl > held_out.perplexity * (1 + targets.max_perplexity_increase):
            continue
        if quality is not None:  # as served: with the prompt tokens' default
            fr = await quality.perplexity(exit | {"prefill": prefill or {}})
            figures |= {"free_running_perplexity": round(fr, 3), "free_running_perplexity_full": round(quality.full, 3)}
            progress(f"threshold {t}: perplexity {ppl:.2f} (full {held_out.perplexity:.2f}), free-running {fr:.2f} "
                     f"(full {quality.full:.2f})")  # fmt: skip
            if fr > quality.full * (1 + targets.max_free_running_increase):
                continue
        layers, _ = evaluation.compute_used(tf.exit_layers, list(plan.exit_points), plan.num_layers, "learned",
                                            backfill, plan.min_exit_depth, evaluation.costs_of(engine))  # fmt: skip
        return figures | {"compute_saved": round(1 - layers, 4)}
    return {"threshold": 1.0, "agreement": 1.0, "compute_saved": 0.0}


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
    for d, figures in sorted(pack.manifest["evaluation"].get("prompt_validation", {}).items(), key=lambda i: int(i[0])):
        lines.append(
            f"prompt exit {d:>3}: agreement {figures['agreement_untrained']:.1%} untrained -> "
            f"{figures['agreement_adapted']:.1%} ({figures['head']}), router AUC {figures['router_auc']:.2f}"
        )
    tuned = pack.manifest["evaluation"]["defaults"]
    least = tuned["targets"].get("min_compute_saved", 0)
    setting = (f"threshold {pack.defaults['threshold']}, {pack.defaults['backfill']} back-fill "
               f"({tuned['agreement']:.1%} agreement, {tuned['compute_saved']:.1%} layer compute saved")  # fmt: skip
    line = f"default: policy learned, {setting}"
    if pack.defaults["policy"] != "learned":
        line = f"default: full depth (saves under {least:.0%}; the best learned setting within the targets: {setting}"
    if "perplexity" in tuned:
        line += f", perplexity {tuned['perplexity']:.2f} against {tuned['perplexity_full']:.2f}"
    if "free_running_perplexity" in tuned:
        line += (f", free-running perplexity {tuned['free_running_perplexity']:.2f} against "
                 f"{tuned['free_running_perplexity_full']:.2f}")  # fmt: skip
    lines.append(line + ")")
    if "prefill" in pack.defaults:
        got = pack.manifest["evaluation"]["prefill"]
        if "accuracy" in got:
            lines.append(
                f"prompt tokens: {pack.defaults['prefill']} (accuracy {got['accuracy']:.1%} against "
                f"{got['accuracy_full']:.1%}, prompt compute saved {got['prompt_compute_saved']:.1%})"
            )
        else:
            lines.append(f"prompt tokens: full depth (no prompt exit kept the accuracy and perplexity targets and "
                         f"saved {least:.0%} or more)")  # fmt: skip
    return lines
