"""Exit calibration: an exit pack trained from the model's own hidden states, on served-like data (chat
prompts with the model's own continuations) and text.

Per early exit point d (depth: layers run), everything fitted to the full model:
- exit head: one adapter kind per exit point (identity, residual low-rank, residual full-rank linear, or
  linear plus a small MLP; `workers.exits.Adapter`), started from ridge least squares towards the last
  layer's hidden state and distilled: KL from the full model's next-token distribution to the exit head's
  (the tuned lens). Every kind asked for trains; the one that saves the most on validation after its own
  cost is kept;
- router: a small MLP on h_d (and optionally the head's confidence features) estimating the probability
  that exiting at d keeps the full model's token; the exit decision weighs it against the compute exiting
  saves and the harm its back-filled K/V does to later tokens (`workers.exits.ExitCost`);
- maps (for `mapped` back-fill): per skipped layer l > d, a least-squares low-rank residual map from h_d
  to layer l's real input, on every position read (prompts included).

Heads and routers train on each window's positions from its `start` (a chat continuation's generated
positions), validation on whole groups (one prompt's continuations) training never read. Memory stays
bounded on long corpora: windows stream through the model; the maps need only running first and second
moments; heads and routers keep the exit-point hidden states of at most `max_tokens` positions (float16),
never every layer's."""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import AutoModelForCausalLM, PreTrainedModel

from workers.device import resolve_device
from workers.exit_pack import PROMPT_PREFIX, ExitPack
from workers.exits import Adapter, confidence_features
from workers.layers import rms_norm
from workers.model_store import fingerprint

log = logging.getLogger(__name__)

# Exit-head kinds calibration can train (workers.exits.Adapter): the model's own head, a residual low-rank
# map, a residual full-rank linear map, the linear map plus a small MLP.
HEAD_KINDS = ("identity", "low_rank", "linear", "mlp")


@dataclass
class CalibrationSettings:
    exit_points: list[int]  # early exit points (depths below the model's layer count)
    max_tokens: int = 32768  # positions the heads and routers train on (every window position fits the maps)
    heads: list[str] = field(default_factory=lambda: ["linear", "mlp"])  # kinds trained; validation picks one
    prompt_heads: list[str] = field(default_factory=lambda: ["linear"])  # prompt tokens' own; []: none
    adapter_rank: int = 128  # of a low_rank head
    mlp_hidden: int = 1024  # of an mlp head
    # what an adapter's matrices are stored (and validated) in: float8_e4m3fn quarters a full-rank head's
    # float32 at a loss within validation noise on the default model, for a pack small enough to ship
    adapter_dtype: str = "float16"
    map_rank: int = 12
    steps: int = 300  # distillation steps (all exit points train together on one batch per step)
    batch_size: int = 256
    lr: float = 3e-4  # least squares starts close: a small step keeps distillation from undoing it
    router_hidden: int = 32
    router_steps: int = 600
    router_features: list[str] = field(default_factory=lambda: ["hidden"])  # + "confidence" (an LM head)
    cost_weight: float = 1.0  # exponent of the compute saving in the exit decision; 0: agreement only
    default_backfill: str = "mapped"  # requests' default with this pack (policy learned; the threshold is tuned)
    ridge: float = 1e-4  # relative to the mean variance of h_d
    validation_fraction: float = 0.1  # of the groups (prompts, corpus windows), for the pack's own figures
    device: str = "auto"  # where the model reads the data and the heads train: CUDA when there is one
    seed: int = 0


@dataclass
class _Inputs:
    """Running first and second moments of the regressors h_d (shared by every fit from depth d)."""

    n: int
    sx: torch.Tensor
    sxx: torch.Tensor

    @classmethod
    def zeros(cls, h: int, device: torch.device | None = None) -> _Inputs:
        z = {"dtype": torch.float64, "device": device}
        return cls(0, torch.zeros(h, **z), torch.zeros(h, h, **z))

    def add(self, x: torch.Tensor) -> None:
        self.n += x.shape[0]
        self.sx += x.sum(0)
        self.sxx += x.T @ x


@dataclass
class _Targets:
    """Running sums of one regression target y and its cross-moment with the regressors."""

    sy: torch.Tensor
    sxy: torch.Tensor

    @classmethod
    def zeros(cls, h: int, device: torch.device | None = None) -> _Targets:
        z = {"dtype": torch.float64, "device": device}
        return cls(torch.zeros(h, **z), torch.zeros(h, h, **z))

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.sy += y.sum(0)
        self.sxy += x.T @ y


def _ridge(x: _Inputs, y: _Targets, ridge: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Ridge least squares of y on x (float64): (w [H, H], mean of x, mean of y) with y - my ≈ (x - mx) w."""
    mx, my = x.sx / x.n, y.sy / x.n
    cxx = x.sxx / x.n - torch.outer(mx, mx)
    cxy = y.sxy / x.n - torch.outer(mx, my)
    h = cxx.shape[0]
    return torch.linalg.solve(cxx + ridge * cxx.trace() / h * torch.eye(h, dtype=cxx.dtype), cxy), mx, my


def _reduced_rank(x: _Inputs, y: _Targets, rank: int, ridge: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ridge fit of y on x, then its best rank-r version (reduced-rank regression): (down [r, H],
    up [H, r], bias [H]) with y ≈ up(down(x)) + bias."""
    w, mx, my = _ridge(x, y, ridge)
    cxx = x.sxx / x.n - torch.outer(mx, mx)
    _, vectors = torch.linalg.eigh(w.T @ cxx @ w)  # directions of the fitted values, ascending
    v = vectors[:, -rank:]
    wr = w @ v
    return wr.T.float(), v.float(), (my - (mx @ wr) @ v.T).float()


@dataclass(frozen=True)
class Window:
    """Token ids the model reads in one pass. Positions from `start` on train the exit heads and routers
    (for a chat prompt with the model's continuation: the generated ones), every position the back-fill
    maps. Windows of one `group` (one prompt's continuations) fall on one side of the validation split;
    without a group a window is its own."""

    ids: list[int]
    start: int = 0
    group: int | None = None


@dataclass
class _Kept:
    """Exit-point hidden states, the last layer's output (before the final norm) and the group of the kept
    positions."""

    hidden: dict[int, list[torch.Tensor]]
    final: list[torch.Tensor]
    groups: list[int] = field(default_factory=list)
    count: int = 0


def calibrate(
    model_path: Path,
    windows: Iterable[Window],
    settings: CalibrationSettings,
    describe_data: dict,
    model_name: str | None = None,
) -> ExitPack:
    """Read windows until `max_tokens` kept positions, fit, distill and train; the pack it returns records
    the settings, the data and its own validation figures (on whole groups training did not read). Heads
    and routers for generated tokens train on positions from each window's start; with `prompt_heads`,
    prompt tokens' own on the positions before it (once per group)."""
    started = time.perf_counter()
    torch.manual_seed(settings.seed)
    if not settings.heads or set(settings.heads + settings.prompt_heads) - set(HEAD_KINDS):
        raise ValueError(f"head kinds must be some of {', '.join(HEAD_KINDS)}, got {settings.heads} and "
                         f"{settings.prompt_heads} for prompts")  # fmt: skip
    if settings.adapter_dtype not in ADAPTER_DTYPES:
        raise ValueError(f"adapter dtype must be one of {', '.join(ADAPTER_DTYPES)}, got {settings.adapter_dtype}")
    device = resolve_device(settings.device)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval().to(device)
    num_layers = model.config.num_hidden_layers
    points = sorted(settings.exit_points)
    if not points or points[0] < 1 or points[-1] >= num_layers:
        raise ValueError(f"exit points to calibrate must be depths in [1, {num_layers - 1}], got {points}")
    head = _Head(model.model.norm.weight.detach(), model.get_output_embeddings().weight.detach(),
                 model.config.rms_norm_eps)  # fmt: skip

    x_m, map_m, kept, prompt_kept = _read(model, windows, points, settings)
    log.info("fitting %d back-fill maps by least squares", len(map_m))
    tensors: dict[str, torch.Tensor] = {}
    for (d, layer), m in map_m.items():
        down, up, bias = _reduced_rank(x_m[d], m, settings.map_rank, settings.ridge)
        tensors |= {f"map.{d}.{layer}.down": down, f"map.{d}.{layer}.up": up, f"map.{d}.{layer}.bias": bias}
    log.info("generated tokens' heads and routers, on %d positions", kept.count)
    decode = _train_phase(head, kept, points, settings.heads, model.config, settings)
    tensors |= decode.tensors
    manifest = {
        "model": {"name": model_name or model_path.name, "fingerprint": fingerprint(model_path)},
        "num_layers": num_layers,
        "exit_points": [*points, num_layers],
        "heads": decode.chosen,
        "router": {"features": settings.router_features, "cost": {"weight": settings.cost_weight, "harm": {}}},
        "training": {"data": describe_data, **decode.figures, "settings": asdict(settings)},
        "evaluation": {"validation": decode.per_point},
        "defaults": {"policy": "learned", "backfill": settings.default_backfill},
    }
    if settings.prompt_heads and prompt_kept.count >= MIN_PROMPT_POSITIONS:
        log.info("prompt tokens' heads and routers, on %d positions", prompt_kept.count)
        prompt = _train_phase(head, prompt_kept, points, settings.prompt_heads, model.config, settings)
        tensors |= {PROMPT_PREFIX + k: v for k, v in prompt.tensors.items()}
        manifest["prompt_heads"] = prompt.chosen
        manifest["training"]["prompt"] = prompt.figures
        manifest["evaluation"]["prompt_validation"] = prompt.per_point
    elif settings.prompt_heads:
        log.info("%d prompt positions: too few for prompt heads (%d); prompt tokens take the generated tokens'",
                 prompt_kept.count, MIN_PROMPT_POSITIONS)  # fmt: skip
    manifest["training"]["seconds"] = round(time.perf_counter() - started, 1)
    # float16 halves the maps (adapters come in their own dtype); the routers are small and stay float32
    stored = {k: (v.float() if "router." in k else v.half() if k.startswith("map.") else v).cpu()
              for k, v in tensors.items()}  # fmt: skip
    return ExitPack(manifest, stored)


MIN_PROMPT_POSITIONS = 256
ADAPTER_DTYPES = ("float32", "bfloat16", "float16", "float8_e4m3fn")


@dataclass
class _Trained:
    """What one phase's heads and routers came to: tensors (adapter.*, router.*), the kind chosen per exit
    point, validation figures per exit point, and the phase's training figures for the manifest."""

    tensors: dict[str, torch.Tensor]
    chosen: dict[str, str]
    per_point: dict[str, dict]
    figures: dict


def _train_phase(
    head: _Head, kept: _Kept, points: list[int], kinds: list[str], config, settings: CalibrationSettings
) -> _Trained:
    """Every head kind of `kinds` from least squares, distilled; per exit point the kind worth its cost on
    validation; then the routers of the chosen heads."""
    hidden = {d: torch.cat(kept.hidden[d]) for d in points}
    final = torch.cat(kept.final)
    train, val = _split(torch.tensor(kept.groups), settings.validation_fraction)
    log.info("%d positions train the heads, %d (whole groups) validate them", len(train), len(val))
    candidates = {
        kind: {d: _least_squares(kind, hidden[d][train], final[train], settings, head.eps) for d in points}
        for kind in kinds
    }
    least_squares = {kind: {d: head.figures(hidden[d][val], final[val], a) for d, a in by_d.items()}
                     for kind, by_d in candidates.items()}  # fmt: skip
    distilled = [k for k in kinds if k != "identity"]
    probe = train[: min(len(train), 2048)]  # the distillation loss on fixed training positions, before and after

    def loss_on_probe(kind: str) -> float:
        return statistics.fmean(head.figures(hidden[d][probe], final[probe], candidates[kind][d])["kl"] for d in points)

    before = {k: loss_on_probe(k) for k in distilled}
    candidates |= _distill(head, hidden, final, train, {k: candidates[k] for k in distilled}, settings)
    # validation judges the heads as they will be stored
    candidates = {k: {d: _as_stored(a, settings.adapter_dtype) for d, a in by_d.items()}
                  for k, by_d in candidates.items()}  # fmt: skip
    loss = {k: {"before": round(before[k], 4), "after": round(loss_on_probe(k), 4)} for k in distilled}
    log.info("distillation loss (mean KL over exit points): %s",
             ", ".join(f"{k} {v['before']:.3f} -> {v['after']:.3f}" for k, v in loss.items()))  # fmt: skip
    untrained = {d: head.figures(hidden[d][val], final[val], Adapter()) for d in points}
    table = {d: {k: head.figures(hidden[d][val], final[val], candidates[k][d]) for k in kinds} for d in points}
    costs = {k: head_cost(k, config, settings) for k in HEAD_KINDS}
    chosen = {d: _worth_it(table[d], costs, config.num_hidden_layers - d) for d in points}
    adapters = {d: candidates[chosen[d]][d] for d in points}
    tensors: dict[str, torch.Tensor] = {}
    for d, adapter in adapters.items():
        tensors |= {f"adapter.{d}.{name}": t for name, t in _tensors(adapter, settings.adapter_dtype).items()}
    routers, router_figures = _train_routers(head, hidden, final, train, val, adapters, settings)
    for d, r in routers.items():
        tensors |= {f"router.{d}.{k}": v for k, v in r.items()}
    per_point = {}
    for d in points:
        ridge = least_squares.get("linear", least_squares.get("low_rank", {})).get(d, untrained[d])
        per_point[str(d)] = {
            "head": chosen[d],
            "heads": {k: table[d][k] | {"cost_layers": round(costs[k], 4)} for k in kinds},
            "agreement_untrained": untrained[d]["agreement"],
            "agreement_least_squares": ridge["agreement"],
            "agreement_adapted": table[d][chosen[d]]["agreement"],
            "kl_untrained": untrained[d]["kl"],
            "kl_least_squares": ridge["kl"],
            "kl_adapted": table[d][chosen[d]]["kl"],
            **router_figures[d],
        }
    figures = {"tokens": kept.count, "validation_tokens": len(val), "distillation_loss": loss}
    return _Trained(tensors, {str(d): k for d, k in chosen.items()}, per_point, figures)


def _split(groups: torch.Tensor, fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, validation) position indices: every k-th group in reading order validates (k = 1 / fraction),
    so that each source of data (chat continuations, corpus text) is in both parts."""
    order = list(dict.fromkeys(groups.tolist()))
    k = max(2, round(1 / fraction))
    held = set(order[k - 1 :: k])
    is_val = torch.tensor([g in held for g in groups.tolist()], dtype=torch.bool)
    if not is_val.any() or is_val.all():  # too few groups: the last positions validate
        n_val = max(1, int(fraction * len(groups)))
        is_val = torch.arange(len(groups)) >= len(groups) - n_val
    return (~is_val).nonzero().squeeze(1), is_val.nonzero().squeeze(1)


def head_cost(kind: str, config, settings: CalibrationSettings) -> float:
    """An exit head's own cost per position in decoder-layer equivalents (multiply-adds of its adapter
    against one layer's projections; the final norm and LM head are common to every kind)."""
    h, inter = config.hidden_size, config.intermediate_size
    kv = h * config.num_key_value_heads // config.num_attention_heads
    layer = 2 * h * h + 2 * h * kv + 3 * h * inter
    adapter = {"identity": 0, "low_rank": 2 * h * settings.adapter_rank, "linear": h * h,
               "mlp": h * h + 2 * h * settings.mlp_hidden}[kind]  # fmt: skip
    return adapter / layer


def _worth_it(figures: dict[str, dict], costs: dict[str, float], layers_after: int) -> str:
    """The head kind that saves the most: agreement on validation times the layers an exit skips, less
    the head's own cost (an exit is only worth taking where the head agrees)."""
    return max(figures, key=lambda k: figures[k]["agreement"] * layers_after - costs[k])


def _least_squares(kind: str, x: torch.Tensor, final: torch.Tensor, s: CalibrationSettings, eps: float) -> Adapter:
    """The head's closed-form start (Din et al.): ridge least squares of the last hidden state, at h_d's
    scale, on h_d; reduced to rank r for low_rank; an MLP starts as the linear fit plus a zero MLP."""
    if kind == "identity":
        return Adapter()
    x_m, y_m = _Inputs.zeros(x.shape[1], x.device), _Targets.zeros(x.shape[1], x.device)
    for i in range(0, x.shape[0], 4096):
        xc, yc = x[i : i + 4096].double(), final[i : i + 4096].double()
        x_m.add(xc)
        y_m.add(xc, yc * (_rms(xc) / _rms(yc)) - xc)  # the final norm drops scale: the target at h_d's
    if kind == "low_rank":
        down, up, bias = _reduced_rank(x_m, y_m, s.adapter_rank, s.ridge)
        return Adapter(down=down, up=up, bias=bias)
    w, mx, my = _ridge(x_m, y_m, s.ridge)
    weight, bias = w.T.float(), (my - mx @ w).float()
    if kind == "linear":
        return Adapter(weight=weight, bias=bias)
    gen = torch.Generator().manual_seed(s.seed)
    w1 = (torch.randn(s.mlp_hidden, x.shape[1], generator=gen) / x.shape[1] ** 0.5).to(x.device)
    return Adapter(weight=weight, bias=bias, w1=w1, b1=torch.zeros(s.mlp_hidden, device=x.device),
                   w2=torch.zeros(x.shape[1], s.mlp_hidden, device=x.device), eps=eps)  # fmt: skip


def _tensors(adapter: Adapter, dtype: str | None = None) -> dict[str, torch.Tensor]:
    """An adapter's tensors, as they are or as stored: matrices in `dtype`, biases in float16 (float32 with
    float32 matrices)."""
    out = {name: getattr(adapter, name).detach() for name in ADAPTER_TENSORS if getattr(adapter, name) is not None}
    if dtype is None:
        return out
    matrix = getattr(torch, dtype)
    bias = matrix if matrix == torch.float32 else torch.float16
    return {name: t.to(matrix if name in MATRICES else bias) for name, t in out.items()}


def _as_stored(adapter: Adapter, dtype: str) -> Adapter:
    """The adapter as its stored tensors give it back (float32)."""
    return Adapter(**{k: v.float() for k, v in _tensors(adapter, dtype).items()}, eps=adapter.eps)


ADAPTER_TENSORS = ("weight", "down", "up", "bias", "w1", "b1", "w2")
MATRICES = ("weight", "down", "up", "w1", "w2")


def _read(
    model: PreTrainedModel, windows: Iterable[Window], points: list[int], settings: CalibrationSettings
) -> tuple[dict[int, _Inputs], dict[tuple[int, int], _Targets], _Kept, _Kept]:
    """Stream windows through the full model, capturing each layer's input and the final hidden state:
    moments of every position for the maps; the positions from each window's start (generated tokens) and,
    for prompt heads, those before it, once per group (a prompt's sampled continuations repeat it)."""
    layers = model.model.layers
    num_layers = len(layers)
    h = model.config.hidden_size
    inputs: list[torch.Tensor | None] = [None] * (num_layers + 1)

    def capture(index: int):
        def hook(_module, args, kwargs):
            inputs[index] = (args[0] if args else kwargs["hidden_states"])[0].detach()

        return hook

    hooks = [layer.register_forward_pre_hook(capture(i), with_kwargs=True) for i, layer in enumerate(layers)]
    hooks.append(model.model.norm.register_forward_pre_hook(capture(num_layers), with_kwargs=True))
    device = model.device
    x_m = {d: _Inputs.zeros(h, device) for d in points}
    map_m = {(d, layer): _Targets.zeros(h, device) for d in points for layer in range(d + 1, num_layers)}
    kept, prompt_kept = _Kept({d: [] for d in points}, []), _Kept({d: [] for d in points}, [])
    seen: set[int] = set()
    budget = settings.max_tokens
    try:
        with torch.no_grad(), tqdm(total=budget, desc="hidden states", unit="tok", leave=False) as bar:
            for i, w in enumerate(windows):
                group = w.group if w.group is not None else -1 - i
                ids = w.ids[: w.start + budget - kept.count]
                take_prompt = bool(settings.prompt_heads) and group not in seen and prompt_kept.count < budget
                if len(ids) < 2 or (len(ids) <= w.start and not take_prompt):
                    continue
                seen.add(group)
                model.model(torch.tensor([ids], device=device), use_cache=False)
                for d in points:
                    x = inputs[d].double()
                    x_m[d].add(x)
                    for layer in range(d + 1, num_layers):
                        map_m[(d, layer)].add(x, inputs[layer].double() - x)
                last = inputs[num_layers]
                parts = [(kept, slice(w.start, len(ids)))]
                if take_prompt:
                    parts.append((prompt_kept, slice(0, min(w.start, len(ids)))))
                for into, at in parts:
                    n = at.stop - at.start
                    if n <= 0:
                        continue
                    for d in points:
                        into.hidden[d].append(inputs[d][at].half())
                    into.final.append(last[at].half())
                    into.groups += [group] * n
                    into.count += n
                bar.update(max(0, len(ids) - w.start))
                if kept.count >= budget:
                    break
    finally:
        for hook in hooks:
            hook.remove()
    if kept.count < 16:
        raise ValueError(f"the data gave only {kept.count} positions; calibration needs at least a few thousand")
    log.info("read %d positions of generated tokens and text, %d of prompts", kept.count, prompt_kept.count)
    return x_m, map_m, kept, prompt_kept


def _rms(x: torch.Tensor) -> torch.Tensor:
    return x.pow(2).mean(-1, keepdim=True).sqrt()


@dataclass
class _Head:
    """The model's final norm and LM head, applied to (adapted) exit hidden states."""

    norm: torch.Tensor
    lm_head: torch.Tensor
    eps: float

    def logits(self, h: torch.Tensor, adapter: Adapter) -> torch.Tensor:
        return F.linear(rms_norm(adapter(h.float()), self.norm, self.eps), self.lm_head)

    def teacher(self, final: torch.Tensor) -> torch.Tensor:
        """The full model's next-token log-probabilities from its last layer's output."""
        return torch.log_softmax(F.linear(rms_norm(final.float(), self.norm, self.eps), self.lm_head), dim=-1)

    def figures(self, h: torch.Tensor, final: torch.Tensor, adapter: Adapter, chunk: int = 512) -> dict:
        """Agreement of the head's greedy token with the full model's, and KL(full || head), per token."""
        agree, kl = 0.0, 0.0
        with torch.no_grad():
            for i in range(0, h.shape[0], chunk):
                t = self.teacher(final[i : i + chunk])
                s = torch.log_softmax(self.logits(h[i : i + chunk], adapter), dim=-1)
                agree += float((s.argmax(-1) == t.argmax(-1)).sum())
                kl += float(F.kl_div(s, t, log_target=True, reduction="sum"))
        return {"agreement": round(agree / h.shape[0], 4), "kl": round(kl / h.shape[0], 4)}


def _distill(
    head: _Head,
    hidden: dict[int, torch.Tensor],
    final: torch.Tensor,
    train: torch.Tensor,
    init: dict[str, dict[int, Adapter]],
    s: CalibrationSettings,
) -> dict[str, dict[int, Adapter]]:
    """KL distillation of every head at once (the tuned lens): one batch per step, the teacher's
    distribution computed once and shared by every exit point and head kind."""
    params = {k: {d: {n: t.clone().float().requires_grad_(True) for n, t in _tensors(a).items()}
                  for d, a in by_d.items()} for k, by_d in init.items()}  # fmt: skip
    optim = torch.optim.Adam([p for by_d in params.values() for ps in by_d.values() for p in ps.values()], lr=s.lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optim, max(1, s.steps))
    gen = torch.Generator().manual_seed(s.seed)
    eps = head.eps
    heads = sum(len(by_d) for by_d in params.values())
    with tqdm(range(s.steps if heads else 0), desc="distilling exit heads", leave=False) as bar:
        for _ in bar:
            batch = train[torch.randint(0, len(train), (min(s.batch_size, len(train)),), generator=gen)]
            with torch.no_grad():
                teacher = head.teacher(final[batch])
            optim.zero_grad()
            total = 0.0
            for by_d in params.values():
                for d, p in by_d.items():
                    student = torch.log_softmax(head.logits(hidden[d][batch], Adapter(**p, eps=eps)), dim=-1)
                    loss = F.kl_div(student, teacher, log_target=True, reduction="batchmean")
                    loss.backward()
                    total += float(loss.detach())
            optim.step()
            schedule.step()
            bar.set_postfix(kl=f"{total / heads:.3f}")
    return {k: {d: Adapter(**{n: t.detach() for n, t in p.items()}, eps=eps) for d, p in by_d.items()}
            for k, by_d in params.items()}  # fmt: skip


def _train_routers(
    head: _Head,
    hidden: dict[int, torch.Tensor],
    final: torch.Tensor,
    train: torch.Tensor,
    val: torch.Tensor,
    adapters: dict[int, Adapter],
    s: CalibrationSettings,
) -> tuple[dict[int, dict[str, torch.Tensor]], dict[int, dict]]:
    """Per exit point, an MLP predicting whether the exit head's greedy token is the full model's."""
    routers, figures = {}, {}
    with torch.no_grad():
        target = torch.cat([head.teacher(final[i : i + 512]).argmax(-1) for i in range(0, final.shape[0], 512)])
    for d in tqdm(sorted(hidden), desc="training routers", leave=False):
        features, labels = [], []
        with torch.no_grad():
            for i in range(0, final.shape[0], 512):
                h = hidden[d][i : i + 512].float()
                logits = head.logits(h, adapters[d])
                labels.append((logits.argmax(-1) == target[i : i + 512]).float())
                x = rms_norm(h, None, head.eps)
                if "confidence" in s.router_features:
                    x = torch.cat([x, confidence_features(logits)], dim=-1)
                features.append(x)
        x, y = torch.cat(features), torch.cat(labels)
        net = torch.nn.Sequential(torch.nn.Linear(x.shape[1], s.router_hidden), torch.nn.GELU(),
                                  torch.nn.Linear(s.router_hidden, 1)).to(x.device)  # fmt: skip
        optim = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=1e-2)
        gen = torch.Generator().manual_seed(s.seed + d)
        for _ in range(s.router_steps):
            batch = train[torch.randint(0, len(train), (min(1024, len(train)),), generator=gen)]
            loss = F.binary_cross_entropy_with_logits(net(x[batch]).squeeze(-1), y[batch])
            optim.zero_grad()
            loss.backward()
            optim.step()
        with torch.no_grad():
            p = torch.sigmoid(net(x[val]).squeeze(-1))
            figures[d] = {
                "router_positive_rate": round(float(y[val].mean()), 4),
                "router_bce": round(float(F.binary_cross_entropy(p, y[val])), 4),
                "router_auc": round(_auc(p, y[val]), 4),
            }
            routers[d] = {
                "w1": net[0].weight.detach().clone(),
                "b1": net[0].bias.detach().clone(),
                "w2": net[2].weight.detach().clone(),
                "b2": net[2].bias.detach().clone(),
            }
    return routers, figures


def _auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Area under the ROC curve (rank statistic); 0.5 when one class is missing."""
    pos, neg = int(labels.sum()), int((1 - labels).sum())
    if pos == 0 or neg == 0:
        return 0.5
    ranks = torch.empty_like(scores)
    ranks[scores.argsort()] = torch.arange(1, len(scores) + 1, dtype=scores.dtype)
    return float((ranks[labels > 0].sum() - pos * (pos + 1) / 2) / (pos * neg))
