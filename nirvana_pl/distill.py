"""Distillation from the dense model during recovery: the teacher, the chunked KL and the loss mix.

At a prune event the callback keeps a frozen copy of the model as it was just before the cut (the
*teacher*). From then on every training forward of the pruned model (the *student*) also runs the
teacher on the same inputs, and the loss the student trains on becomes::

    (1 - weight) * loss + weight * T^2 * KL(softmax(teacher / T) || softmax(student / T))

with the KL averaged over the non-padded positions. The mix happens in a forward hook on the model,
so a LightningModule whose ``training_step`` calls the model with ``labels`` and returns
``outputs.loss`` distils without a change; a module that computes its own loss calls
:meth:`Distiller.mix` (``NirvanaPruningCallback.distilled_loss``).

Memory: the teacher's logits never exist for all positions at once. For a decoder whose adapter splits
it into a body and an LM head, the teacher runs its body (hidden states, ``[tokens, hidden]``) and the
head is applied ``chunk_tokens`` positions at a time, in fp32 for the softmax; the gradient is written
chunk by chunk in backward, recomputing the teacher's chunk logits, so nothing of size
``[batch, seq, vocab]`` in fp32 is kept between forward and backward. Models without that split
(encoder-decoders) run the whole teacher and keep its logits in the teacher's dtype.

No Lightning here: the callback decides when the teacher is taken; this module says how it is used.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from typing import Any, Callable, Mapping

import torch
from torch import nn

TEACHERS = ("dense", "previous")


@dataclass
class DistillConfig:
    """How recovery distils from the model as it was before the prune.

    Args:
        weight: share of the distillation term in the loss, ``(1 - weight) * loss + weight * T^2 * KL``;
            1.0 trains on the KL alone.
        temperature: softmax temperature T of teacher and student (the term is scaled by T^2, so that its
            gradient keeps its size as T changes).
        teacher: ``"dense"``: the model before the first prune, for every event of a schedule;
            ``"previous"``: the model before the latest prune.
        chunk_tokens: positions whose vocabulary logits exist at once (fp32) in the KL.
    """

    weight: float = 0.5
    temperature: float = 1.0
    teacher: str = "dense"
    chunk_tokens: int = 512

    def __post_init__(self) -> None:
        if not (isinstance(self.weight, (int, float)) and 0.0 < float(self.weight) <= 1.0):
            raise ValueError(
                f"distill weight={self.weight!r} must be in (0, 1]: the loss is (1 - weight) * loss + weight * KL "
                "(1.0 trains on the KL alone). To train without distillation, leave distill= out."
            )
        if not (isinstance(self.temperature, (int, float)) and float(self.temperature) > 0.0):
            raise ValueError(f"distill temperature={self.temperature!r} must be a positive number (e.g. 1.0 or 2.0).")
        if self.teacher not in TEACHERS:
            raise ValueError(
                f"distill teacher={self.teacher!r}: choose 'dense' (the model before the first prune) or 'previous' "
                "(the model before the latest prune of a schedule)."
            )
        if not (isinstance(self.chunk_tokens, int) and self.chunk_tokens >= 1):
            raise ValueError(f"distill chunk_tokens={self.chunk_tokens!r} must be a positive integer (e.g. 512).")
        self.weight, self.temperature = float(self.weight), float(self.temperature)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def distill_config(options: Any) -> DistillConfig | None:
    """A :class:`DistillConfig` from ``True`` (the defaults), a mapping of its fields, or a DistillConfig."""
    if options is None or options is False:
        return None
    if options is True:
        return DistillConfig()
    if isinstance(options, DistillConfig):
        return options
    if isinstance(options, Mapping):
        unknown = sorted(set(options) - set(DistillConfig.__dataclass_fields__))
        if unknown:
            raise ValueError(
                f"distill={dict(options)!r}: unknown key(s) {unknown}; the keys are "
                f"{sorted(DistillConfig.__dataclass_fields__)}."
            )
        return DistillConfig(**options)
    raise TypeError(
        f"distill={options!r}: expected True, a DistillConfig, or a dict of its fields, e.g. "
        "{'weight': 0.5, 'temperature': 1.0}."
    )


# ------------------------------------------------------------------------------------------------ teacher
def make_teacher(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """A frozen copy of ``model`` in eval mode: no hooks, no gradients, floating parameters in ``dtype``.

    The parameters are copied straight into ``dtype`` (no full-precision copy on the way); buffers
    (e.g. rotary frequencies) keep theirs. Hooks are not copied: a copied hook would run the callback's
    code on the teacher, and a deep copy of a bound method would copy its owner.
    """
    memo: dict[int, Any] = {}
    for module in model.modules():
        for name, value in vars(module).items():
            if isinstance(value, dict) and "hooks" in name:
                memo[id(value)] = type(value)()
        for p in module.parameters(recurse=False):
            if id(p) not in memo:
                data = p.detach()
                if dtype is not None and p.is_floating_point():
                    data = data.to(dtype, copy=True)
                else:
                    data = data.clone()
                memo[id(p)] = nn.Parameter(data, requires_grad=False)
    teacher = copy.deepcopy(model, memo)
    teacher.eval()
    return teacher


def teacher_dtype(precision: str) -> torch.dtype | None:
    """The teacher's parameter dtype for a Lightning ``precision``: bf16 or fp16 when the fit computes in it."""
    precision = str(precision)
    if precision.startswith("bf16"):
        return torch.bfloat16
    if precision.startswith("16"):
        return torch.float16
    return None


# ------------------------------------------------------------------------------------------------ the KL
_LOG_ZERO = torch.finfo(torch.float32).min


class _ChunkedKL(torch.autograd.Function):
    """``sum_r w_r * T^2 * KL(p_r || q_r)`` over rows of student logits, gradient written chunk by chunk.

    ``teacher_rows(a, b)`` gives the teacher's logits of rows ``a:b``; it is called again in backward, so
    only the student's logits (alive anyway) and the row weights are kept for it.
    """

    @staticmethod
    def forward(ctx, student: torch.Tensor, weights: torch.Tensor, teacher_rows: Callable, t: float, chunk: int):
        total = torch.zeros((), dtype=torch.float32, device=student.device)
        for a, b in _chunks(student.shape[0], weights, chunk):
            log_q = (student[a:b].float() / t).log_softmax(-1)
            # (a token the teacher rules out, logit -inf, adds 0, not 0 * inf)
            log_p = (teacher_rows(a, b).float() / t).log_softmax(-1).clamp_min(_LOG_ZERO)
            kl = (log_p.exp() * (log_p - log_q)).sum(-1)
            total += (kl * weights[a:b]).sum()
            del log_q, log_p, kl
        ctx.save_for_backward(student, weights)
        ctx.teacher_rows, ctx.t, ctx.chunk = teacher_rows, t, chunk
        return total * (t * t)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        student, weights = ctx.saved_tensors
        t = ctx.t
        grad = torch.zeros_like(student)
        scale = grad_output.float() * t  # d(T^2 KL)/d student logit = T (q - p)
        with torch.no_grad():
            for a, b in _chunks(student.shape[0], weights, ctx.chunk):
                q = (student[a:b].float() / t).softmax(-1)
                p = (ctx.teacher_rows(a, b).float() / t).softmax(-1)
                grad[a:b] = ((q - p) * (weights[a:b, None] * scale)).to(grad.dtype)
                del q, p
        return grad, None, None, None, None


def _chunks(rows: int, weights: torch.Tensor, chunk: int):
    """Row ranges of at most ``chunk`` rows; ranges whose weights are all zero (padding) are skipped."""
    for a in range(0, rows, chunk):
        b = min(a + chunk, rows)
        if bool(weights[a:b].any()):
            yield a, b


def chunked_kl(
    student_logits: torch.Tensor,
    teacher_rows: Callable[[int, int], torch.Tensor],
    mask: torch.Tensor | None,
    temperature: float = 1.0,
    chunk_tokens: int = 512,
) -> torch.Tensor:
    """``T^2`` times the mean over unmasked positions of KL(teacher_T || student_T), differentiable in the student.

    ``student_logits``: ``[..., vocab]``; ``teacher_rows(a, b)``: the teacher's logits of flattened rows
    ``a:b``; ``mask``: 1 where a position counts (same leading shape as the logits), None for all.
    """
    flat = student_logits.reshape(-1, student_logits.shape[-1])
    if mask is None:
        weights = torch.ones(flat.shape[0], device=flat.device, dtype=torch.float32)
    else:
        weights = mask.reshape(-1).to(device=flat.device, dtype=torch.float32)
    count = weights.sum()
    if float(count) == 0.0:
        return student_logits.sum() * 0.0
    return _ChunkedKL.apply(flat, weights / count, teacher_rows, float(temperature), int(chunk_tokens))


# ------------------------------------------------------------------------------------------------ the hook
#: call arguments that belong to the student's own loss or cache, not to the teacher's forward
_STUDENT_ONLY = ("labels", "use_cache", "past_key_values", "logits_to_keep", "num_items_in_batch", "return_dict")


class Distiller:
    """Holds the teacher and mixes the distillation term into the student's training loss.

    :meth:`attach` hooks the student's forward once; the hook does nothing until :meth:`set_teacher`, and only
    while :attr:`active` (the callback sets it for the duration of each training batch, so validation forwards
    and the callback's own scoring passes are left alone).
    """

    def __init__(self, config: DistillConfig):
        self.config = config
        self.teacher: nn.Module | None = None
        self._body_and_head: Callable[[nn.Module], Any] | None = None
        self._handle: Any = None
        #: set by the caller around its training steps: only the forwards in between are distilled
        self.active = False
        self._last: tuple[torch.Tensor, torch.Tensor] | None = None  # (student logits, KL) of the latest forward
        #: what the latest training forwards gave since :meth:`pop_metrics`: KL, the user's loss, the mixed loss
        self._metrics: dict[str, list[float]] = {"distill_kl": [], "student_loss": [], "distill_loss": []}
        self.unmixed_forwards = 0  # training forwards with no loss to mix (the module computes its own)
        self.mixed_by_call = 0

    # ---------------------------------------------------------------------------------------- teacher
    def set_teacher(self, teacher: nn.Module) -> None:
        self.teacher = teacher

    def wants_new_teacher(self) -> bool:
        """Whether a prune event should take a new teacher (always for 'previous'; once for 'dense')."""
        return self.teacher is None or self.config.teacher == "previous"

    # ---------------------------------------------------------------------------------------- hook
    def attach(self, model: nn.Module, body_and_head: Callable[[nn.Module], Any] | None = None) -> None:
        """Hook ``model``'s forward; ``body_and_head``: the architecture's split of a model (see the class)."""
        self.detach()
        self._body_and_head = body_and_head
        self._handle = model.register_forward_hook(self._after_forward, with_kwargs=True)

    def detach(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def _after_forward(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        # (not module.training: a model loaded with from_pretrained is in eval mode, and Lightning leaves it so)
        if self.teacher is None or not self.active or not torch.is_grad_enabled():
            return None
        logits = getattr(output, "logits", None)
        if not isinstance(logits, torch.Tensor):
            return None
        inputs = dict(kwargs)
        if args:  # model(input_ids, ...) positionally
            inputs.setdefault("input_ids", args[0])
        kl = self.kl(module, inputs, logits)
        loss = getattr(output, "loss", None)
        self._metrics["distill_kl"].append(float(kl.detach()))
        if loss is None:  # the module computes its own loss and passes it to mix()
            self._last = (logits, kl)
            self.unmixed_forwards += 1
            return None
        mixed = self._mix(loss, kl)
        self._record_mix(loss, mixed)
        output.loss = mixed  # (a transformers ModelOutput updates its "loss" key too)
        return output

    # ---------------------------------------------------------------------------------------- the term
    def kl(self, student: nn.Module, inputs: Mapping[str, Any], student_logits: torch.Tensor) -> torch.Tensor:
        """The distillation term of one forward: the teacher runs on ``inputs`` (the student's call arguments)."""
        teacher = self.teacher
        if teacher is None:
            raise RuntimeError("no teacher yet: distillation starts at the first prune event.")
        labels = inputs.get("labels")
        encoder_decoder = bool(getattr(student.config, "is_encoder_decoder", False))
        call = {k: v for k, v in inputs.items() if k not in _STUDENT_ONLY}
        if encoder_decoder and call.get("decoder_input_ids") is None and labels is not None:
            shift = getattr(teacher, "prepare_decoder_input_ids_from_labels", None)
            if shift is not None:
                call["decoder_input_ids"] = shift(labels=labels)
            else:  # the teacher derives its decoder inputs itself (and computes a loss nobody reads)
                call["labels"] = labels
        split = self._split(teacher)
        with torch.no_grad():
            if split is not None:
                body, head = split
                hidden = body(**call, use_cache=False).last_hidden_state
                per_position = hidden.reshape(-1, hidden.shape[-1])
                rows = _head_rows(per_position, head, _weight_dtype(teacher))
            else:
                per_position = teacher(**call, use_cache=False).logits
                per_position = per_position.reshape(-1, per_position.shape[-1])
                rows = lambda a, b: per_position[a:b]  # noqa: E731
        positions = student_logits.shape[:-1].numel()
        if per_position.shape[0] != positions:
            raise ValueError(
                f"distillation: the student returned logits for {positions} positions but the teacher computed "
                f"{per_position.shape[0]}; call the model without logits_to_keep in training_step."
            )
        mask = _position_mask(inputs, labels, encoder_decoder)
        return chunked_kl(student_logits, rows, mask, self.config.temperature, self.config.chunk_tokens)

    def _split(self, teacher: nn.Module):
        if self._body_and_head is None:
            return None
        try:
            return self._body_and_head(teacher)
        except ValueError:  # no body/head split (e.g. an encoder-decoder): the whole teacher runs
            return None

    def _mix(self, loss: torch.Tensor, kl: torch.Tensor) -> torch.Tensor:
        w = self.config.weight
        return kl.to(loss.dtype) if w == 1.0 else (1.0 - w) * loss + w * kl.to(loss.dtype)

    def mix(self, loss: torch.Tensor, outputs: Any) -> torch.Tensor:
        """The loss to train on for a module that computes its own ``loss`` from ``outputs`` (the model's return).

        Before the first prune (no teacher) ``loss`` itself. ``outputs`` must be the latest training forward's.
        """
        if self.teacher is None:
            return loss
        logits = getattr(outputs, "logits", outputs)
        if self._last is None or self._last[0] is not logits:
            raise ValueError(
                "distilled_loss(loss, outputs): outputs must be what the model returned in this training step (the "
                "teacher ran on that call); got another object."
            )
        kl = self._last[1]
        self._last = None
        mixed = self._mix(loss, kl)
        self.mixed_by_call += 1
        self._record_mix(loss, mixed)
        return mixed

    # ---------------------------------------------------------------------------------------- metrics
    def _record_mix(self, loss: torch.Tensor, mixed: torch.Tensor) -> None:
        self._metrics["student_loss"].append(float(loss.detach()))
        self._metrics["distill_loss"].append(float(mixed.detach()))

    def pop_metrics(self) -> dict[str, float]:
        """Means over the training forwards since the last call (a step with gradient accumulation has several);
        called at the end of each training batch."""
        out = {k: sum(v) / len(v) for k, v in self._metrics.items() if v}
        for v in self._metrics.values():
            v.clear()
        self._last = None  # (its graph is not kept past the step)
        return out

    # ---------------------------------------------------------------------------------------- resume
    def state_dict(self) -> dict[str, Any] | None:
        return None if self.teacher is None else {"weights": self.teacher.state_dict()}

    def load_teacher(self, skeleton: nn.Module, state: Mapping[str, Any]) -> None:
        """Restore the teacher into ``skeleton`` (a copy of the model with the teacher's shapes)."""
        skeleton.load_state_dict(state["weights"])
        skeleton.requires_grad_(False).eval()
        self.teacher = skeleton


def _head_rows(hidden: torch.Tensor, head: Callable, dtype: torch.dtype):
    """Teacher logits of flattened rows ``a:b``, the same in forward and in backward (no autocast)."""

    def rows(a: int, b: int) -> torch.Tensor:
        with torch.no_grad(), torch.autocast(hidden.device.type, enabled=False):
            return head(hidden[a:b].to(dtype))

    return rows


def _weight_dtype(model: nn.Module) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def _position_mask(inputs: Mapping[str, Any], labels: Any, encoder_decoder: bool) -> torch.Tensor | None:
    """1 where a position of the student's logits counts: the decoder's non-padded positions."""
    if encoder_decoder:
        mask = inputs.get("decoder_attention_mask")
        if mask is None and isinstance(labels, torch.Tensor):
            mask = labels != -100
        return mask
    mask = inputs.get("attention_mask")
    return mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
