"""Llama 2's causal-LM loss: transformers' `ForCausalLMLoss`, same arguments and value, without its logits-sized
copies; and the same loss taken from the hidden states and the LM head's weight without the logits at all.

This file is copied beside saved weights with the model's, for `trust_remote_code=True`: it imports only torch and
transformers.
"""

import torch
from torch import nn
from torch.autograd.function import once_differentiable
from transformers.loss.loss_utils import ForCausalLMLoss


class TokenCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of (tokens, vocab) logits over the targets that are not `ignore_index`, divided by
    `divisor`, saving only each token's log-sum-exp for the backward pass.

    `F.cross_entropy` saves the whole log-softmax and allocates two more logits-sized tensors in its backward;
    a Llama's logits are its largest activation (32000 floats a token), so those copies are most of the loss's
    memory and, on a CPU, a tenth of a small model's training step. Here both passes go over blocks of rows that
    stay in cache, and the gradient, softmax minus one-hot, is written once. Values and gradients equal
    `F.cross_entropy`'s up to float rounding, in fp32 whatever the logits' dtype."""

    @staticmethod
    def forward(
        ctx, logits: torch.Tensor, targets: torch.Tensor, ignore_index: int, divisor: torch.Tensor | int | None
    ) -> torch.Tensor:
        counted, targets, divisor = _counted_targets(targets, ignore_index, divisor)
        rows = _loss_block_rows(logits)
        log_sum_exp = torch.cat([torch.logsumexp(block.float(), dim=-1) for block in logits.split(rows)])
        target_logits = logits.gather(1, targets[:, None]).squeeze(1).float()
        ctx.save_for_backward(logits, targets, counted, log_sum_exp, divisor)
        return torch.where(counted, log_sum_exp - target_logits, 0.0).sum() / divisor

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        logits, targets, counted, log_sum_exp, divisor = ctx.saved_tensors
        row_scale = torch.where(counted, grad_loss / divisor, 0.0)
        grad = torch.empty_like(logits)
        rows = _loss_block_rows(logits)
        fp32 = logits.dtype == torch.float32
        buffer = None if fp32 else logits.new_empty((min(rows, logits.shape[0]), logits.shape[1]), dtype=torch.float32)
        for start in range(0, logits.shape[0], rows):
            block = slice(start, start + rows)
            out = grad[block] if fp32 else buffer[: grad[block].shape[0]]
            # d loss / d logits = (softmax(logits) - one_hot(target)) * grad_loss / divisor, zero on ignored rows
            torch.sub(logits[block], log_sum_exp[block, None], out=out).exp_().mul_(row_scale[block, None])
            out.scatter_add_(1, targets[block, None], -row_scale[block, None])
            if not fp32:
                grad[block] = out
        return grad, None, None, None


class LinearCrossEntropy(torch.autograd.Function):
    """`TokenCrossEntropy` of the logits `hidden @ weight.T`, which are never whole in memory: the LM head runs over
    blocks of tokens, and each block's gradients are taken at once in the forward pass, since they are linear in the
    loss's incoming gradient (a scalar), which the backward pass only multiplies in.

    A training step then holds one block of logits (about 64 MB of fp32) instead of the logits and their gradient
    (each 32000 floats a token) for the same matrix products, so the same speed. Values and gradients equal the
    logits path's up to float rounding; the weight's gradient is summed over the blocks in fp32."""

    @staticmethod
    def forward(
        ctx,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        targets: torch.Tensor,
        ignore_index: int,
        divisor: torch.Tensor | int | None,
    ) -> torch.Tensor:
        counted, targets, divisor = _counted_targets(targets, ignore_index, divisor)
        row_scale = torch.where(counted, 1 / divisor, 0.0)  # d loss / d summed token loss, zero on ignored rows
        need_hidden, need_weight = ctx.needs_input_grad[:2]
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if need_weight else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        rows = _head_block_rows(weight)
        for start in range(0, hidden.shape[0], rows):
            block = slice(start, start + rows)
            logits = (hidden[block] @ weight.T).float()
            target = targets[block, None]
            target_logits = logits.gather(1, target).squeeze(1)
            # log-sum-exp in place: `torch.logsumexp` would allocate a second block; the exponentials are kept
            row_max = logits.amax(dim=-1, keepdim=True)
            exp_sum = logits.sub_(row_max).exp_().sum(dim=-1, keepdim=True)
            log_sum_exp = (row_max + exp_sum.log()).squeeze(1)
            total += torch.where(counted[block], log_sum_exp - target_logits, 0.0).sum()
            if need_hidden or need_weight:
                scale = row_scale[block, None]
                grad = logits.mul_(scale / exp_sum).scatter_add_(1, target, -scale)  # softmax minus one-hot, scaled
                if need_hidden:
                    grad_hidden[block] = grad.to(hidden.dtype) @ weight
                if need_weight:
                    grad_weight.addmm_(grad.T, hidden[block].float())
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return total / divisor

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad_loss.to(grad_hidden.dtype)
        if grad_weight is not None:
            grad_weight = (grad_weight * grad_loss).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None, None


def _counted_targets(
    targets: torch.Tensor, ignore_index: int, divisor: torch.Tensor | int | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Which targets count, the targets with ignored ones made a valid index (0, masked out later), and the divisor
    of the summed loss (the counted targets unless given)."""
    counted = targets != ignore_index
    divisor = counted.sum() if divisor is None else torch.as_tensor(divisor, device=targets.device)
    return counted, torch.where(counted, targets, 0), divisor


def _head_block_rows(weight: torch.Tensor) -> int:
    """Tokens per block of `LinearCrossEntropy`: 64 MB of fp32 logits on a CPU, 256 MB elsewhere; large enough
    for the LM head's matrix products to run at full speed."""
    elements = 2**24 if weight.device.type == "cpu" else 2**26
    return max(1, elements // weight.shape[0])


def _loss_block_rows(logits: torch.Tensor) -> int:
    """Rows per block of the loss: about 2 MB of fp32 on a CPU (cache-sized), a few large kernels elsewhere."""
    elements = 2**19 if logits.device.type == "cpu" else 2**26
    return max(1, elements // logits.shape[-1])


def next_token_targets(labels: torch.Tensor, ignore_index: int, shift_labels: torch.Tensor | None) -> torch.Tensor:
    """The target of every position, flat: the next label (`ignore_index` after the last), or `shift_labels` as
    given."""
    if shift_labels is None:
        shift_labels = nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    return shift_labels.reshape(-1)


def causal_lm_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    vocab_size: int,
    num_items_in_batch: torch.Tensor | int | None = None,
    ignore_index: int = -100,
    shift_labels: torch.Tensor | None = None,
    **kwargs,
) -> torch.Tensor:
    """transformers' `ForCausalLMLoss`, same arguments and value: next-token cross-entropy, averaged over the
    counted tokens or summed and divided by `num_items_in_batch` (gradient accumulation), computed in fp32
    by `TokenCrossEntropy`. Under `torch.compile` it is transformers' own, which inductor fuses by itself."""
    if torch.compiler.is_compiling():
        return ForCausalLMLoss(logits, labels, vocab_size, num_items_in_batch, ignore_index, shift_labels, **kwargs)
    logits = logits.reshape(-1, vocab_size)
    targets = next_token_targets(labels, ignore_index, shift_labels).to(logits.device)
    return TokenCrossEntropy.apply(logits, targets, ignore_index, num_items_in_batch)


def causal_lm_head_loss(
    hidden_states: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    num_items_in_batch: torch.Tensor | int | None = None,
    ignore_index: int = -100,
    shift_labels: torch.Tensor | None = None,
    **kwargs,
) -> torch.Tensor:
    """`causal_lm_loss` of the logits `hidden_states @ weight.T` (a bias-free LM head), with the same other
    arguments, computed by `LinearCrossEntropy` without materializing the logits."""
    hidden_states = hidden_states.reshape(-1, hidden_states.shape[-1])
    targets = next_token_targets(labels, ignore_index, shift_labels).to(hidden_states.device)
    if not torch.is_grad_enabled():  # else the Function is told they need gradients, and takes them
        hidden_states, weight = hidden_states.detach(), weight.detach()
    return LinearCrossEntropy.apply(hidden_states, weight, targets, ignore_index, num_items_in_batch)
