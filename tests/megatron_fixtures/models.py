"""Models for the Megatron adapter tests: a toy with Megatron's model interface, and a tiny GPT."""
from __future__ import annotations

import torch
from torch import nn

HIDDEN = 8


def toy_config(**overrides):
    from megatron.core.transformer.transformer_config import TransformerConfig

    # The schedules read fields that only TransformerConfig has (fine_grained_activation_offloading).
    return TransformerConfig(num_layers=2, hidden_size=HIDDEN, num_attention_heads=1, **overrides)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(HIDDEN, HIDDEN)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(self.fc(x))


class ToyModel(nn.Module):
    """What the schedules ask of a model: ``config``, ``model_type``, ``set_input_tensor``, and
    for ``finalize_model_grads`` a ``finish_grad_sync`` (Megatron's DDP has one; a single
    process has nothing to reduce)."""

    def __init__(self, config=None):
        from megatron.core.enums import ModelType

        super().__init__()
        self.config = config if config is not None else toy_config()
        self.model_type = ModelType.encoder_or_decoder
        self.layers = nn.ModuleList(Block() for _ in range(2))
        self.head = nn.Linear(HIDDEN, 1)
        self.input_tensor = None
        self.grad_syncs = 0

    def set_input_tensor(self, input_tensor):
        self.input_tensor = input_tensor

    def finish_grad_sync(self, force_all_reduce=False):
        self.grad_syncs += 1

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def toy_forward_step(data_iterator, model):
    """Megatron's forward_step_func contract: (output, loss_func)."""
    x = next(data_iterator)
    out = model(x)

    def loss_func(output):
        loss = output.pow(2).mean()
        return loss, {"loss": loss.detach()}

    return out, loss_func


def toy_batches(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return iter([torch.randn(4, HIDDEN, generator=g) for _ in range(n)])


# ---------------------------------------------------------------------- tiny GPT
SEQ, VOCAB, MICRO_BATCH = 16, 64, 2


def tiny_gpt(num_layers=2, hidden=32, heads=4, dtype=torch.float32):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.core.transformer.transformer_config import TransformerConfig

    cfg = TransformerConfig(
        num_layers=num_layers, hidden_size=hidden, num_attention_heads=heads, use_cpu_initialization=True,
        hidden_dropout=0.0, attention_dropout=0.0, bf16=dtype is torch.bfloat16, params_dtype=dtype,
    )
    return GPTModel(cfg, get_gpt_layer_local_spec(), vocab_size=VOCAB, max_sequence_length=SEQ)


def gpt_batches(n, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return iter([torch.randint(0, VOCAB, (MICRO_BATCH, SEQ), generator=g).to(device) for _ in range(n)])


def gpt_forward_step(data_iterator, model):
    tokens = next(data_iterator)
    position_ids = torch.arange(SEQ, device=tokens.device).unsqueeze(0).expand_as(tokens)
    # Megatron's mask convention: True where attention is NOT allowed.
    attention_mask = torch.ones(1, 1, SEQ, SEQ, dtype=torch.bool, device=tokens.device).triu(1)
    labels = torch.roll(tokens, -1, dims=1)
    per_token = model(tokens, position_ids, attention_mask, labels=labels)

    def loss_func(output):
        loss = output.float().mean()
        return loss, {"lm loss": loss.detach()}

    return per_token, loss_func
