"""Placeholder tokens: old ids keep the frozen table, new ids read the trainable rows."""

import pytest
import torch
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from balora_diffusion import paths
from balora_diffusion.embeddings import ExtendedEmbedding, add_placeholder_tokens
from balora_diffusion.errors import UserError

TOKENIZER = paths.TOKENIZER


def _encoder():
    torch.manual_seed(0)
    return CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, bos_token_id=49406, eos_token_id=49407))


def test_new_token_starts_as_its_init_word_and_only_its_row_trains():
    tokenizer, encoder = CLIPTokenizer.from_pretrained(TOKENIZER), _encoder()
    table = encoder.get_input_embeddings().weight.detach().clone()
    emb = add_placeholder_tokens(tokenizer, encoder, ["<zorb>"], "heart")
    assert isinstance(encoder.get_input_embeddings(), ExtendedEmbedding)
    heart = tokenizer("heart", add_special_tokens=False).input_ids
    assert torch.equal(emb.extra[0], table[heart].mean(0))
    ids = tokenizer(["a <zorb> and a heart"], return_tensors="pt").input_ids
    assert tokenizer.convert_tokens_to_ids("<zorb>") == 49408 and 49408 in ids
    out = emb(ids)
    old = ids < 49408
    assert torch.equal(out[old], table[ids[old]])
    assert torch.equal(out[~old], emb.extra.detach().expand(int((~old).sum()), -1))
    encoder(ids)[0].sum().backward()
    assert emb.extra.grad is not None and emb.extra.grad.abs().sum() > 0
    assert emb.base.weight.grad is None or not emb.base.weight.requires_grad


def test_existing_tokens_are_refused():
    tokenizer, encoder = CLIPTokenizer.from_pretrained(TOKENIZER), _encoder()
    with pytest.raises(UserError, match="already exist"):
        add_placeholder_tokens(tokenizer, encoder, ["cat</w>"], "dog")


def test_injecting_lora_keeps_the_new_rows_trainable(random_sd_dir):
    from balora_diffusion.lora import inject_lora
    from balora_diffusion.models import load_pipeline
    from balora_diffusion.train_config import TrainConfig

    pipe = load_pipeline(random_sd_dir, device="cpu")
    pipe.unet.requires_grad_(False), pipe.text_encoder.requires_grad_(False)
    emb = add_placeholder_tokens(pipe.tokenizer, pipe.text_encoder, ["<zorb>"], "heart")
    inject_lora(pipe.unet, {"text_encoder": pipe.text_encoder}, TrainConfig())
    assert emb.extra.requires_grad
    others = [name for name, p in pipe.text_encoder.named_parameters() if p.requires_grad and p is not emb.extra]
    assert others and all("lora_" in name for name in others)
