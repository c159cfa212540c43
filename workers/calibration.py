"""Exit calibration: an exit pack trained from the model's own hidden states on a corpus.

Per early exit point d (depth: layers run), everything fitted to the full model:
- adapter: a residual low-rank map on h_d, started from least squares towards the last layer's hidden
  state, then distilled: KL from the full model's next-token distribution to the exit head's;
- router: a small MLP on h_d (and optionally the head's confidence features) estimating the probability
  that exiting at d keeps the full model's token; the exit decision weighs it against the compute exiting
  saves and the harm its back-filled K/V does to later tokens (`workers.exits.ExitCost`);
- maps (for `mapped` back-fill): per skipped layer l > d, a least-squares low-rank residual map from h_d
  to layer l's real input.

Memory stays bounded on long corpora: windows stream through the model; the maps need only running first
and second moments; adapters and routers train on the exit-point hidden states of at most `max_tokens`
tokens (float16), never on every layer's."""

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

from workers.exit_pack import ExitPack
from workers.exits import confidence_features
from workers.layers import rms_norm
from workers.model_store import fingerprint

log = logging.getLogger(__name__)


@dataclass
class CalibrationSettings:
    exit_points: list[int]  # early exit points (depths below the model's layer count)
    max_tokens: int = 32768  # corpus tokens read; adapters and routers keep all of them
    adapter_rank: int = 128
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
    validation_fraction: float = 0.1  # of the kept tokens, for the pack's own figures
    seed: int = 0


@dataclass
class _Inputs:
    """Running first and second moments of the regressors h_d (shared by every fit from depth d)."""

    n: int
    sx: torch.Tensor
    sxx: torch.Tensor

    @classmethod
    def zeros(cls, h: int) -> _Inputs:
        return cls(0, torch.zeros(h, dtype=torch.float64), torch.zeros(h, h, dtype=torch.float64))

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
    def zeros(cls, h: int) -> _Targets:
        return cls(torch.zeros(h, dtype=torch.float64), torch.zeros(h, h, dtype=torch.float64))

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.sy += y.sum(0)
        self.sxy += x.T @ y


def _reduced_rank(x: _Inputs, y: _Targets, rank: int, ridge: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Ridge least squares of y on x, then the best rank-r version of its fit (reduced-rank regression):
    (down [r, H], up [H, r], bias [H]) with y ≈ up(down(x)) + bias."""
    mx, my = x.sx / x.n, y.sy / x.n
    cxx = x.sxx / x.n - torch.outer(mx, mx)
    cxy = y.sxy / x.n - torch.outer(mx, my)
    h = cxx.shape[0]
    w = torch.linalg.solve(cxx + ridge * cxx.trace() / h * torch.eye(h, dtype=cxx.dtype), cxy)
    _, vectors = torch.linalg.eigh(w.T @ cxx @ w)  # directions of the fitted values, ascending
    v = vectors[:, -rank:]
    wr = w @ v
    return wr.T.float(), v.float(), (my - (mx @ wr) @ v.T).float()


@dataclass
class _Kept:
    """Exit-point hidden states and the full model's final normed hidden state of the kept tokens."""

    hidden: dict[int, list[torch.Tensor]]
    final: list[torch.Tensor]
    count: int = 0


def calibrate(
    model_path: Path,
    windows: Iterable[list[int]],
    settings: CalibrationSettings,
    describe_data: dict,
    model_name: str | None = None,
) -> ExitPack:
    """Read windows (token id lists) until `max_tokens`, fit, distill and train; the pack it returns
    records the settings, the data and its own validation figures."""
    started = time.perf_counter()
    torch.manual_seed(settings.seed)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    num_layers = model.config.num_hidden_layers
    points = sorted(settings.exit_points)
    if not points or points[0] < 1 or points[-1] >= num_layers:
        raise ValueError(f"exit points to calibrate must be depths in [1, {num_layers - 1}], got {points}")
    eps = model.config.rms_norm_eps
    norm_w = model.model.norm.weight.detach()
    lm_head = model.get_output_embeddings().weight.detach()

    x_m, adapter_m, map_m, kept = _read(model, windows, points, settings.max_tokens)
    log.info("fitting %d back-fill maps and %d adapters by least squares", len(map_m), len(adapter_m))
    tensors: dict[str, torch.Tensor] = {}
    for (d, layer), m in map_m.items():
        down, up, bias = _reduced_rank(x_m[d], m, settings.map_rank, settings.ridge)
        tensors |= {f"map.{d}.{layer}.down": down, f"map.{d}.{layer}.up": up, f"map.{d}.{layer}.bias": bias}
    adapters = {d: _reduced_rank(x_m[d], adapter_m[d], settings.adapter_rank, settings.ridge) for d in points}

    hidden = {d: torch.cat(kept.hidden[d]) for d in points}
    final = torch.cat(kept.final)
    n_val = max(1, int(settings.validation_fraction * kept.count))
    train, val = slice(0, kept.count - n_val), slice(kept.count - n_val, kept.count)
    head = _Head(norm_w, lm_head, eps)
    before = {d: head.figures(hidden[d][val], final[val], None) for d in points}
    least_squares = {d: head.figures(hidden[d][val], final[val], adapters[d]) for d in points}
    probe = slice(0, min(train.stop, 2048))  # the distillation loss on fixed training tokens, before and after
    loss_before = statistics.fmean(head.figures(hidden[d][probe], final[probe], adapters[d])["kl"] for d in points)
    adapters = _distill(head, hidden, final, train, adapters, settings)
    loss_after = statistics.fmean(head.figures(hidden[d][probe], final[probe], adapters[d])["kl"] for d in points)
    log.info("distillation loss (mean KL over exit points) %.4f -> %.4f", loss_before, loss_after)
    after = {d: head.figures(hidden[d][val], final[val], adapters[d]) for d in points}
    for d, (down, up, bias) in adapters.items():
        tensors |= {f"adapter.{d}.down": down, f"adapter.{d}.up": up, f"adapter.{d}.bias": bias}

    routers, router_figures = _train_routers(head, hidden, final, train, val, adapters, settings)
    for d, r in routers.items():
        tensors |= {f"router.{d}.{k}": v for k, v in r.items()}

    per_point = {
        str(d): {
            "agreement_untrained": before[d]["agreement"],
            "agreement_least_squares": least_squares[d]["agreement"],
            "agreement_adapted": after[d]["agreement"],
            "kl_untrained": before[d]["kl"],
            "kl_least_squares": least_squares[d]["kl"],
            "kl_adapted": after[d]["kl"],
            **router_figures[d],
        }
        for d in points
    }
    manifest = {
        "model": {"name": model_name or model_path.name, "fingerprint": fingerprint(model_path)},
        "num_layers": num_layers,
        "exit_points": [*points, num_layers],
        "router": {"features": settings.router_features, "cost": {"weight": settings.cost_weight, "harm": {}}},
        "training": {
            "data": describe_data,
            "tokens": kept.count,
            "validation_tokens": n_val,
            "distillation_loss": {"before": round(loss_before, 4), "after": round(loss_after, 4)},
            "settings": asdict(settings),
            "seconds": round(time.perf_counter() - started, 1),
        },
        "evaluation": {"validation": per_point},
        "defaults": {"policy": "learned", "backfill": settings.default_backfill},
    }
    # float16 halves the pack; the routers are small and stay float32
    stored = {k: v.half() if not k.startswith("router.") else v.float() for k, v in tensors.items()}
    return ExitPack(manifest, stored)


def _read(
    model: PreTrainedModel, windows: Iterable[list[int]], points: list[int], max_tokens: int
) -> tuple[dict[int, _Inputs], dict[int, _Targets], dict[tuple[int, int], _Targets], _Kept]:
    """Stream windows through the full model, capturing each layer's input and the final hidden state."""
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
    x_m = {d: _Inputs.zeros(h) for d in points}
    adapter_m = {d: _Targets.zeros(h) for d in points}
    map_m = {(d, layer): _Targets.zeros(h) for d in points for layer in range(d + 1, num_layers)}
    kept = _Kept({d: [] for d in points}, [])
    norm = model.model.norm
    try:
        with torch.no_grad(), tqdm(total=max_tokens, desc="hidden states", unit="tok", leave=False) as bar:
            for ids in windows:
                ids = ids[: max_tokens - kept.count]
                if len(ids) < 2:
                    break
                model.model(torch.tensor([ids]), use_cache=False)
                last = inputs[num_layers]
                for d in points:
                    x = inputs[d].double()
                    x_m[d].add(x)
                    # the adapter's target: the last hidden state at h_d's scale (the final norm drops scale)
                    adapter_m[d].add(x, last.double() * (_rms(x) / _rms(last.double())) - x)
                    for layer in range(d + 1, num_layers):
                        map_m[(d, layer)].add(x, inputs[layer].double() - x)
                    kept.hidden[d].append(inputs[d].half())
                kept.final.append(norm(last).half())
                kept.count += len(ids)
                bar.update(len(ids))
                if kept.count >= max_tokens:
                    break
    finally:
        for hook in hooks:
            hook.remove()
    if kept.count < 16:
        raise ValueError(f"the corpus gave only {kept.count} tokens; calibration needs at least a few thousand")
    log.info("read %d tokens", kept.count)
    return x_m, adapter_m, map_m, kept


def _rms(x: torch.Tensor) -> torch.Tensor:
    return x.pow(2).mean(-1, keepdim=True).sqrt()


@dataclass
class _Head:
    """The model's final norm and LM head, applied to (adapted) exit hidden states."""

    norm: torch.Tensor
    lm_head: torch.Tensor
    eps: float

    def logits(self, h: torch.Tensor, adapter: tuple[torch.Tensor, ...] | None) -> torch.Tensor:
        h = h.float()
        if adapter is not None:
            down, up, bias = adapter
            h = h + F.linear(F.linear(h, down), up) + bias
        return F.linear(rms_norm(h, self.norm, self.eps), self.lm_head)

    def teacher(self, final: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(F.linear(final.float(), self.lm_head), dim=-1)

    def figures(self, h: torch.Tensor, final: torch.Tensor, adapter: tuple | None, chunk: int = 512) -> dict:
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
    train: slice,
    init: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    s: CalibrationSettings,
) -> dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """KL distillation of every adapter at once: one batch per step, the teacher's distribution computed
    once and shared by all exit points."""
    params = {d: [t.clone().requires_grad_(True) for t in init[d]] for d in init}
    optim = torch.optim.Adam([p for ps in params.values() for p in ps], lr=s.lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optim, max(1, s.steps))
    n = train.stop - train.start
    gen = torch.Generator().manual_seed(s.seed)
    with tqdm(range(s.steps), desc="distilling adapters", leave=False) as bar:
        for _ in bar:
            batch = torch.randint(train.start, train.stop, (min(s.batch_size, n),), generator=gen)
            with torch.no_grad():
                teacher = head.teacher(final[batch])
            optim.zero_grad()
            total = 0.0
            for d, p in params.items():
                student = torch.log_softmax(head.logits(hidden[d][batch], tuple(p)), dim=-1)
                loss = F.kl_div(student, teacher, log_target=True, reduction="batchmean")
                loss.backward()
                total += float(loss.detach())
            optim.step()
            schedule.step()
            bar.set_postfix(kl=f"{total / len(params):.3f}")
    return {d: tuple(t.detach() for t in p) for d, p in params.items()}


def _train_routers(
    head: _Head,
    hidden: dict[int, torch.Tensor],
    final: torch.Tensor,
    train: slice,
    val: slice,
    adapters: dict[int, tuple],
    s: CalibrationSettings,
) -> tuple[dict[int, dict[str, torch.Tensor]], dict[int, dict]]:
    """Per exit point, an MLP predicting whether the adapted head's greedy token is the full model's."""
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
                                  torch.nn.Linear(s.router_hidden, 1))  # fmt: skip
        optim = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=1e-2)
        gen = torch.Generator().manual_seed(s.seed + d)
        for _ in range(s.router_steps):
            batch = torch.randint(train.start, train.stop, (min(1024, train.stop - train.start),), generator=gen)
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
