"""Each distinct caption of a batch goes through the text encoder once, and that changes neither the
conditioning nor the gradients; with dropout on, every row is encoded."""
import pytest
import torch
from transformers import CLIPTextConfig, CLIPTextModel

from balora_diffusion.text_encoding import encode_captions, has_active_dropout

CPU = torch.device("cpu")


def text_encoder(seed: int = 0, **config) -> CLIPTextModel:
    torch.manual_seed(seed)
    return CLIPTextModel(CLIPTextConfig(
        vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=8, bos_token_id=0, eos_token_id=1, pad_token_id=1, **config)).train()


def batch_sizes_seen(encoder: CLIPTextModel) -> list[int]:
    seen: list[int] = []
    encoder.register_forward_pre_hook(lambda module, args, kwargs: seen.append(args[0].shape[0]), with_kwargs=True)
    return seen


# rows 0 and 2 equal, rows 1 and 3 equal: two distinct captions in a batch of four
IDS = torch.tensor([[0, 5, 6, 1, 1, 1, 1, 1], [0, 7, 8, 9, 1, 1, 1, 1]] * 2)


def test_a_repeated_caption_is_encoded_once_with_the_same_hidden_states_and_gradients():
    encoder = text_encoder()
    seen = batch_sizes_seen(encoder)
    weights = torch.randn(4, 8, 16, generator=torch.Generator().manual_seed(1))

    def grads(encode) -> tuple[torch.Tensor, list[torch.Tensor]]:
        encoder.zero_grad(set_to_none=True)
        hidden = encode()
        (hidden * weights).sum().backward()
        return hidden.detach(), [p.grad.clone() for p in encoder.parameters() if p.grad is not None]

    every_row, every_row_grads = grads(lambda: encoder(IDS)[0])
    distinct, distinct_grads = grads(lambda: encode_captions(encoder, IDS, CPU))
    assert seen == [4, 2]
    torch.testing.assert_close(distinct, every_row, rtol=0, atol=1e-6)
    assert len(distinct_grads) == len(every_row_grads) > 0
    for got, want in zip(distinct_grads, every_row_grads):
        # the copies' gradients are summed in another order: float32 rounding apart
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_distinct_captions_go_through_as_one_batch_in_their_order():
    encoder = text_encoder()
    seen = batch_sizes_seen(encoder)
    ids = IDS[:2].flip(0)
    with torch.no_grad():
        torch.testing.assert_close(encode_captions(encoder, ids, CPU), encoder(ids)[0], rtol=0, atol=0)
    assert seen == [2, 2]


@pytest.mark.parametrize("config", [{"attention_dropout": 0.1}, {"dropout": 0.1}])
def test_with_dropout_in_training_every_row_is_encoded(config):
    encoder = text_encoder(**config)
    seen = batch_sizes_seen(encoder)
    assert has_active_dropout(encoder)
    encode_captions(encoder, IDS, CPU)
    encoder.eval()
    assert not has_active_dropout(encoder)
    encode_captions(encoder, IDS, CPU)
    assert seen == [4, 2]


def test_a_dropout_layer_inside_the_encoder_counts_as_dropout():
    encoder = text_encoder()
    assert not has_active_dropout(encoder)
    mlp = encoder.get_submodule("encoder.layers.0.mlp")
    mlp.fc1 = torch.nn.Sequential(torch.nn.Dropout(0.1), mlp.fc1)
    assert has_active_dropout(encoder)
