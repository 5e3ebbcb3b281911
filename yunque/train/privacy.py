"""DP-SGD: per-record clipping and Gaussian noise over Poisson-sampled batches, and the ε it spends.

The privacy unit is one training record (one example after `data prepare`). A step is DP-SGD as
Abadi et al. (2016) and Opacus run it:

1. Poisson sampling: each of the n records joins the step's batch with probability q = B / n, B being
   the expected batch size (micro_batch * grad_accum). The accountant's amplification by sampling
   assumes exactly this, so there are no epochs of fixed-size batches under DP.
2. The batch is processed micro_batch records at a time, one record per row (right-padded, cut at
   seq_len): packing several records into a row would mix their gradients in every activation.
3. Each record's gradient of its mean token loss is clipped to norm C (max_grad_norm) and the
   clipped gradients are summed; Gaussian noise N(0, sigma^2 C^2) is added once per step, and the
   sum is divided by B, not by the sampled size, which would itself reveal something.
4. AdamW steps on that gradient: post-processing, free of privacy cost.

Per-record gradients, two ways (`privacy.per_sample`):
- hooks (LoRA / QLoRA): a whole micro-batch in one forward and backward. Each adapter's input x and
  output gradient g are caught per row, and the row's gradients of A and B are two small einsums
  (the rank r is small), as Opacus' grad samplers do for nn.Linear. The base never gets any.
- loop: one forward and backward per record. Exact for any module, so full fine-tuning (norms,
  embeddings, the chunked head, yunque/cpu kernels) and adapters with dropout or on lm_head.
Opacus' GradSampleModule is not used: LoRALinear multiplies by its weights directly (F.linear, addmm),
so module hooks on lora_A / lora_B never fire, and the custom autograd functions (RMSNorm, SwiGLU,
the chunked head, the C++ kernels) have no grad samplers nor vmap rules for functorch.

The accountants are Opacus' (PRV by default, RDP), keyed by their history of (sigma, q, steps), which
checkpoints keep as JSON, so a resumed run's ε continues exactly. The sampling and the noise come
from a secret drawn at the start of the run (checkpoints keep it; run.json does not): a known seed
would let anyone subtract the noise.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from yunque.errors import CheckpointError, ConfigError, require
from yunque.lora import lora_modules
from yunque.train.config import TrainConfig
from yunque.train.loss import linear_cross_entropy
from yunque.train.packing import IGNORE, Batch, TokenSource
from yunque.train.step import DeviceBatch, autocast, to_device

# ---------------------------------------------------------------- accounting


def _opacus_accountant(mechanism: str):
    require("opacus", "privacy", "privacy (DP-SGD accounting)")
    from opacus.accountants import create_accountant

    return create_accountant(mechanism)


def epsilon_of(history: list, mechanism: str, delta: float) -> float:
    """ε after the steps of `history` [(sigma, q, steps), ...], by Opacus' accountant; inf where sigma is 0."""
    history = [(float(s), float(q), int(n)) for s, q, n in history if int(n) > 0]
    if not history:
        return 0.0
    if any(s == 0 for s, _, _ in history):
        return math.inf
    acc = _opacus_accountant(mechanism)
    acc.history = history
    return float(acc.get_epsilon(delta=delta))


def noise_for(target_epsilon: float, delta: float, q: float, steps: int, mechanism: str) -> float:
    """The smallest sigma (within Opacus' 0.01 tolerance on ε) that ends `steps` steps at or below `target_epsilon`."""
    _opacus_accountant(mechanism)
    from opacus.accountants.utils import get_noise_multiplier

    try:
        return float(
            get_noise_multiplier(
                target_epsilon=target_epsilon, target_delta=delta, sample_rate=q, steps=steps, accountant=mechanism
            )
        )
    except ValueError:
        raise ConfigError(
            f"privacy.target_epsilon: {target_epsilon:g} cannot be reached in {steps} steps at sampling rate "
            f"{q:.4g} with any noise (fewer steps, a smaller batch or a larger target)"
        ) from None


def resolve_delta(delta: float | str, n: int) -> float:
    """`auto` is 1 / n^1.1; any delta must be below 1 / n, which releasing one record at random already meets."""
    d = 1.0 / n**1.1 if delta == "auto" else float(delta)
    if d >= 1.0 / n:
        raise ConfigError(f"privacy.delta: {d:g} is not below 1/n = {1.0 / n:.3g} for {n} training records")
    return d


class Accountant:
    """ε spent so far: Opacus' history of (sigma, q, steps), with ε cached per history."""

    def __init__(self, mechanism: str, delta: float):
        self.mechanism, self.delta = mechanism, delta
        self.history: list[list] = []
        self._cache: dict[tuple, float] = {}

    def step(self, sigma: float, q: float) -> None:
        if self.history and self.history[-1][0] == sigma and self.history[-1][1] == q:
            self.history[-1][2] += 1
        else:
            self.history.append([sigma, q, 1])

    @property
    def steps(self) -> int:
        return sum(n for _, _, n in self.history)

    def epsilon(self, extra: tuple[float, float, int] | None = None) -> float:
        """ε now, or after `extra` = (sigma, q, steps) more steps."""
        hist = [*self.history, list(extra)] if extra and extra[2] > 0 else self.history
        key = tuple(tuple(h) for h in hist)
        if key not in self._cache:
            self._cache[key] = epsilon_of(hist, self.mechanism, self.delta)
        return self._cache[key]


# ---------------------------------------------------------------- per-record gradients


class _ScaleRows(torch.autograd.Function):
    """Identity forward; backward scales row i of the gradient by w[i] (a per-token loss weight)."""

    @staticmethod
    def forward(ctx, h, w):
        ctx.save_for_backward(w)
        return h.clone()

    @staticmethod
    def backward(ctx, g):
        (w,) = ctx.saved_tensors
        return g * w[:, None].to(g.dtype), None


def record_mean_loss(model, b: DeviceBatch, weights: torch.Tensor) -> torch.Tensor:
    """The summed token loss of `b` (one record per row); its gradient is that of sum_i mean_t loss_it,
    each token weighted by 1 / (its record's trained tokens). Only for a frozen head (hooks)."""
    h = model.hidden(b.input_ids, b.positions, b.mask)
    h = _ScaleRows.apply(h.reshape(-1, h.shape[-1]).index_select(0, b.target_idx), weights)
    head = model.lm_head
    if type(head) is nn.Linear:
        return linear_cross_entropy(h, head.weight, b.targets)
    return F.cross_entropy(head(h).float(), b.targets, reduction="sum")


class LoopGrads:
    """One forward and backward per record: exact for any module, one record's gradient at a time."""

    name = "loop"

    def __init__(self, params: list[nn.Parameter]):
        self.params = params

    def per_record(self, module: nn.Module, b: Batch, lengths: np.ndarray, device, precision: str):
        """Yields (summed token loss, trained tokens, [gradient per parameter]) of each row of `b`."""
        for r, L in enumerate(lengths):
            sl = (slice(r, r + 1), slice(0, int(L)))  # the record alone, unpadded
            row = to_device(Batch(b.input_ids[sl], b.labels[sl], b.positions[sl], b.doc_ids[sl], True), device)
            n = len(row.targets)
            if n == 0:
                yield torch.zeros((), device=device), 0, None
                continue
            with autocast(device, precision):
                loss = module(row.input_ids, row.positions, row.mask, row.target_idx, row.targets)
            (loss / n).backward()
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
            for p in self.params:
                p.grad = None
            yield loss.detach().float(), n, grads

    def add_clipped(self, module, b, lengths, device, precision, acc: list[torch.Tensor], clip: float):
        """Adds each record's clipped gradient into `acc`; returns (loss sum, trained tokens, pre-clip norms)."""
        loss, n, norms = torch.zeros((), device=device), 0, []
        for lo, k, grads in self.per_record(module, b, lengths, device, precision):
            loss, n = loss + lo, n + k
            if grads is None:
                norms.append(0.0)
                continue
            norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])))
            norms.append(norm)
            torch._foreach_add_(acc, [g.float() for g in grads], alpha=clip_factor(norm, clip))
        return loss, n, torch.tensor(norms)


def clip_factor(norm: float, clip: float) -> float:
    """Scale that brings a gradient of `norm` to at most `clip` (Opacus' min(1, C / (norm + 1e-6))); clip 0: off."""
    return 1.0 if clip <= 0 else min(1.0, clip / (norm + 1e-6))


class HookGrads:
    """LoRA / QLoRA: per-row gradients of every adapter from its input and output gradient, one backward per
    micro-batch. Needs rows that are records (inputs (rows, T, in)), so no adapter on lm_head, and no
    adapter dropout (its mask is not seen here)."""

    name = "hooks"

    def __init__(self, model: nn.Module):
        self.mods = lora_modules(model)
        self.params = [p for m in self.mods.values() for p in (m.lora_A.weight, m.lora_B.weight)]

    @staticmethod
    def unsupported(model: nn.Module) -> str | None:
        """Why hooks cannot give this model's per-record gradients, or None."""
        mods = lora_modules(model)
        if not mods:
            return "the model has no LoRA adapters (full fine-tuning)"
        if any(p.requires_grad for n, p in model.named_parameters() if ".lora_" not in n):
            return "parameters other than the adapters are trained"
        for n, m in mods.items():
            if not n.startswith("model.layers."):
                return f"{n} is adapted: its input is not one row per record"
            if m.lora_dropout is not None:
                return "lora.dropout > 0: the dropout mask is not seen by the hooks"
        return None

    def per_row(self, model: nn.Module, b: DeviceBatch, lengths_t: torch.Tensor, precision: str):
        """(summed token loss, {param: (rows, *shape) gradients}) of a micro-batch of records."""
        caught: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

        def hook(name):
            def fwd(mod, inputs, out):
                x = inputs[0].detach()
                if out.requires_grad:
                    out.register_hook(lambda g: caught.__setitem__(name, (x, g)))

            return fwd

        rows = b.input_ids.shape[0]
        owner = torch.div(b.target_idx, b.input_ids.shape[1], rounding_mode="floor")
        weights = 1.0 / lengths_t.clamp(min=1).to(torch.float32)[owner]
        handles = [m.register_forward_hook(hook(n)) for n, m in self.mods.items()]
        try:
            with autocast(b.input_ids.device, precision):
                loss = record_mean_loss(model, b, weights)
            loss.backward()
        finally:
            for h in handles:
                h.remove()
        out: dict[nn.Parameter, torch.Tensor] = {}
        for n, m in self.mods.items():
            A, B = m.lora_A.weight.detach(), m.lora_B.weight.detach()
            if n not in caught:  # no trained token reached it
                out[m.lora_A.weight], out[m.lora_B.weight] = (
                    torch.zeros(rows, *p.shape, device=p.device) for p in (A, B)
                )
                continue
            x, g = (t.float().reshape(rows, -1, t.shape[-1]) for t in caught[n])
            a = x @ A.float().t()  # (rows, T, r)
            out[m.lora_B.weight] = torch.einsum("bto,btr->bor", g, a) * m.scale
            out[m.lora_A.weight] = torch.einsum("btr,bti->bri", g @ B.float(), x) * m.scale
        for p in self.params:
            p.grad = None  # autograd's own (summed) gradient; the per-row ones replace it
        return loss.detach().float(), [out[p] for p in self.params]

    def add_clipped(self, module, b, lengths, device, precision, acc: list[torch.Tensor], clip: float):
        db = to_device(b, device)
        lengths_t = torch.as_tensor((b.labels != IGNORE).sum(1), device=device)
        loss, grads = self.per_row(module.model, db, lengths_t, precision)
        norms = torch.linalg.vector_norm(torch.stack([g.flatten(1).norm(dim=1) for g in grads], 1), dim=1)
        f = (clip / (norms + 1e-6)).clamp(max=1.0) if clip > 0 else torch.ones_like(norms)
        torch._foreach_add_(acc, [torch.einsum("b,b...->...", f, g) for g in grads])
        return loss, int(lengths_t.sum()), norms.cpu()


# ---------------------------------------------------------------- the DP step


def record_rows(source: TokenSource, idx: np.ndarray, seq_len: int, pad_id: int) -> tuple[Batch, np.ndarray]:
    """One record per row, cut at `seq_len`, right-padded to the longest; and each row's token count."""
    docs = [source.doc(int(i)) for i in idx]
    lengths = np.array([min(len(ids), seq_len) for ids, _ in docs], dtype=np.int64)
    T = int(lengths.max()) if len(docs) else 1
    ids = np.full((len(docs), T), pad_id, dtype=np.int64)
    lab = np.full((len(docs), T), IGNORE, dtype=np.int64)
    for r, ((toks, mask), n) in enumerate(zip(docs, lengths)):
        ids[r, :n] = toks[:n]
        tgt = toks[1:n].astype(np.int64)
        lab[r, : n - 1] = tgt if mask is None else np.where(mask[1:n], tgt, IGNORE)
    pos = np.broadcast_to(np.arange(T), (len(docs), T)).copy()
    t = torch.from_numpy
    # Right padding under plain causal attention: a record's tokens never see the padding after them.
    return Batch(t(ids), t(lab), t(pos), torch.zeros(len(docs), T, dtype=torch.int64), True), lengths


@dataclass
class StepResult:
    loss_sum: torch.Tensor  # summed token loss of the sampled records (for the log, like normal training)
    grad_norm: torch.Tensor  # of the noisy, averaged gradient that is applied
    n_targets: int
    tokens: int
    records: int
    clipped: int  # sampled records whose gradient was clipped


class DPTraining:
    """DP-SGD for one run: sampling, per-record clipping, noise, accounting, its checkpoint state and report."""

    def __init__(self, cfg: TrainConfig, source: TokenSource, model: nn.Module, device: torch.device, pad_id: int):
        p = cfg.privacy
        self.p, self.source, self.device, self.pad_id = p, source, device, pad_id
        self.seq_len, self.micro = cfg.data.seq_len, cfg.micro_batch
        self.n = len(source)
        self.batch = cfg.micro_batch * cfg.grad_accum  # expected logical batch size
        self.q = min(1.0, self.batch / self.n)
        self.delta = resolve_delta(p.delta, self.n)
        self.lengths = source.lengths()
        params = [q for q in model.parameters() if q.requires_grad]
        why = HookGrads.unsupported(model)
        if p.per_sample == "hooks" and why:
            raise ConfigError(f"privacy.per_sample: hooks cannot give per-record gradients here: {why}")
        self.grads = HookGrads(model) if p.per_sample != "loop" and why is None else LoopGrads(params)
        self.params = self.grads.params
        self.secret = p.seed if p.seed is not None else secrets.randbits(128)
        self.accountant = Accountant(p.accountant, self.delta)
        self.sigma = p.noise_multiplier
        self.total_steps = 0
        self.stop_step: int | None = None  # the last step max_epsilon allows, when it is before total_steps
        self._seen = [0, 0, 0]  # steps, records sampled and records clipped since the last take_stats()

    def steps_for(self, epochs: float) -> int:
        """Steps of `epochs` passes in expectation: each step samples q of the records."""
        return max(1, math.ceil(round(epochs / self.q, 9)))  # 2 / (8 / 216) is 54.00000000000001, not 55 steps

    def plan(self, total_steps: int) -> None:
        """Fix sigma (from target_epsilon) for a run of `total_steps` steps, and where max_epsilon stops it."""
        self.total_steps = total_steps
        if self.p.target_epsilon is not None:
            self.sigma = noise_for(self.p.target_epsilon, self.delta, self.q, total_steps, self.p.accountant)
        if self.p.max_epsilon is not None and self.sigma == 0:
            raise ConfigError("privacy.max_epsilon: noise_multiplier 0 spends an unbounded ε from the first step")
        self._plan_stop()

    def _plan_stop(self) -> None:
        """The largest step count whose ε stays within max_epsilon (binary search; ε grows with steps)."""
        self.stop_step = None
        if self.p.max_epsilon is None:
            return
        done = self.accountant.steps
        left = self.total_steps - done

        def eps(k: int) -> float:
            return self.accountant.epsilon((self.sigma, self.q, k))

        if left <= 0 or eps(left) <= self.p.max_epsilon:
            return
        lo, hi = 0, left  # eps(lo) <= max < eps(hi), given eps(0) is within budget
        if eps(0) > self.p.max_epsilon:
            self.stop_step = done
            return
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if eps(mid) <= self.p.max_epsilon else (lo, mid)
        self.stop_step = done + lo

    @property
    def final_epsilon(self) -> float:
        """ε at the end of the planned run (at the max_epsilon stop when that comes first)."""
        end = self.stop_step if self.stop_step is not None else self.total_steps
        return self.accountant.epsilon((self.sigma, self.q, end - self.accountant.steps))

    def epsilon(self) -> float:
        return self.accountant.epsilon()

    def _rng(self, step: int, stream: int) -> np.random.Generator:
        return np.random.default_rng([self.secret, stream, step])

    def sample(self, step: int) -> np.ndarray:
        """Step `step`'s Poisson sample: record indices, shortest first (rows of a micro-batch pad less)."""
        idx = np.flatnonzero(self._rng(step, 0).random(self.n) < self.q)
        return idx[np.argsort(self.lengths[idx], kind="stable")]

    def add_noise(self, step: int, acc: list[torch.Tensor]) -> None:
        std = (self.sigma or 0.0) * self.p.max_grad_norm
        if std == 0:
            return
        g = torch.Generator(device=acc[0].device).manual_seed(int(self._rng(step, 1).integers(0, 2**63)))
        for a in acc:
            a.add_(torch.randn(a.shape, generator=g, device=a.device, dtype=a.dtype), alpha=std)

    def noisy_gradient(
        self, step: int, module: nn.Module, idx: np.ndarray, precision: str
    ) -> tuple[list[torch.Tensor], StepResult]:
        """The step's gradient: sum of clipped per-record gradients of records `idx`, plus noise, over B."""
        acc = [torch.zeros(p.shape, dtype=torch.float32, device=p.device) for p in self.params]
        loss, n_targets, tokens, clipped = torch.zeros((), device=self.device), 0, 0, 0
        clip = self.p.max_grad_norm
        for s in range(0, len(idx), self.micro):
            b, lengths = record_rows(self.source, idx[s : s + self.micro], self.seq_len, self.pad_id)
            lo, k, norms = self.grads.add_clipped(module, b, lengths, self.device, precision, acc, clip)
            loss, n_targets, tokens = loss + lo, n_targets + k, tokens + int(lengths.sum())
            clipped += int((norms > clip).sum()) if clip > 0 else 0
        self.add_noise(step, acc)
        torch._foreach_div_(acc, float(self.batch))
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(a) for a in acc]))
        return acc, StepResult(loss, norm, n_targets, tokens, len(idx), clipped)

    def step(self, step: int, module: nn.Module, optimizer: torch.optim.Optimizer, *, precision: str, check=None):
        """One DP-SGD step (step numbers from 0); the accountant counts it whether or not `check` lets it apply."""
        grads, r = self.noisy_gradient(step, module, self.sample(step), precision)
        for p, g in zip(self.params, grads):
            p.grad = g.to(p.dtype)
        if check is None or check(r.loss_sum, r.grad_norm):
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        self.accountant.step(self.sigma, self.q)
        self._seen = [self._seen[0] + 1, self._seen[1] + r.records, self._seen[2] + r.clipped]
        return r

    def take_stats(self) -> dict:
        """Records sampled per step and the share of them clipped, since the last call (for the log)."""
        steps, records, clipped = self._seen
        self._seen = [0, 0, 0]
        return {"records_per_step": records / max(1, steps), "clipped": clipped / max(1, records)}

    # ------------------------------------------------------------ checkpoint and report

    def state_dict(self) -> dict:
        return {
            "mechanism": self.accountant.mechanism,
            "history": [list(h) for h in self.accountant.history],
            "delta": self.delta,
            "noise_multiplier": self.sigma,
            "sample_rate": self.q,
            "secret": format(self.secret, "x"),
        }

    def load_state_dict(self, state: dict | None, source: str) -> None:
        if state is None:
            raise CheckpointError(f"{source}: written without privacy; its steps spent an unaccounted ε")
        if state.get("mechanism") != self.accountant.mechanism:
            raise CheckpointError(
                f"{source}: accounted with {state.get('mechanism')}, not privacy.accountant {self.accountant.mechanism}"
            )
        try:
            hist = [[float(s), float(q), int(n)] for s, q, n in state["history"]]
            self.secret = int(state["secret"], 16)
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{source}: state.json has no readable privacy history") from None
        self.accountant.history = hist
        self._plan_stop()

    def length_stats(self) -> dict:
        L = self.lengths
        return {
            "min": int(L.min()),
            "median": float(np.median(L)),
            "p95": float(np.percentile(L, 95)),
            "max": int(L.max()),
            "truncated": int((L > self.seq_len).sum()),
            "seq_len": self.seq_len,
        }

    def describe(self) -> list[str]:
        """The dry-run's lines: what the run will do and the ε it ends at."""
        ls = self.length_stats()
        eps = self.final_epsilon
        end = self.stop_step if self.stop_step is not None else self.total_steps
        lines = [
            f"privacy: DP-SGD, noise multiplier {self.sigma:.4g}, sampling rate {self.q:.4g} (Poisson, expected batch "
            f"{self.batch} of {self.n:,} records), {end:,} steps, max_grad_norm {self.p.max_grad_norm:g}",
            f"privacy: ε at the end {eps:.3f} (δ {self.delta:.3g}, {self.p.accountant} accountant)"
            if math.isfinite(eps)
            else "privacy: no noise: no privacy guarantee (ε is unbounded)",
            f"privacy: one record per row: lengths min {ls['min']}, median {ls['median']:g}, p95 {ls['p95']:g}, "
            f"max {ls['max']}; {ls['truncated']} of {self.n:,} cut at seq_len {self.seq_len}",
            f"privacy: per-record gradients by {self.grads.name}; optim.grad_clip is not applied "
            "(per-record clipping replaces it)",
        ]
        if self.stop_step is not None:
            lines.append(f"privacy: max_epsilon {self.p.max_epsilon:g} stops the run after step {self.stop_step}")
        return lines

    def report(self, stopped_at_budget: bool = False) -> dict:
        """For run.json and the model card (no secret)."""
        eps = self.epsilon()
        return {
            "dp_sgd": True,
            "privacy_unit": "one training record",
            "epsilon": eps if math.isfinite(eps) else None,
            "delta": self.delta,
            "noise_multiplier": self.sigma,
            "sample_rate": self.q,
            "expected_batch_size": self.batch,
            "max_grad_norm": self.p.max_grad_norm,
            "steps": self.accountant.steps,
            "accountant": self.accountant.mechanism,
            "records": self.n,
            "per_sample_gradients": self.grads.name,
            "record_lengths": self.length_stats(),
            "stopped_at_budget": stopped_at_budget,
            "max_epsilon": self.p.max_epsilon,
        }


def model_card(report: dict, base: str | None) -> str:
    """A README.md for the exported adapter or model: what the privacy guarantee is, in numbers."""
    eps = report["epsilon"]
    e = f"ε = {eps:.3f}" if eps is not None else "ε unbounded (no noise)"
    lines = [
        "---",
        "tags: [yunque, differential-privacy, dp-sgd]",
        *([f"base_model: {base}"] if base else []),
        "---",
        "",
        "# Differentially private fine-tune",
        "",
        f"Trained with DP-SGD by yunque: ({e}, δ = {report['delta']:.3g})-differential privacy with respect to one "
        f"training record ({report['records']:,} records), by the {report['accountant'].upper()} accountant.",
        "",
        "| setting | value |",
        "|---|---|",
        f"| noise multiplier | {report['noise_multiplier']:.4g} |",
        f"| sampling rate (Poisson) | {report['sample_rate']:.4g} |",
        f"| expected batch size | {report['expected_batch_size']} |",
        f"| per-record clipping norm | {report['max_grad_norm']:g} |",
        f"| steps | {report['steps']} |",
        "",
        "The guarantee covers the training records only, not the base model's pretraining data.",
        "",
    ]
    return "\n".join(lines)
