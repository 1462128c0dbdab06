import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import glmjax
from glmjax.serve import greedy_decode_reference
from tests.conftest import GOLDEN


@pytest.fixture(scope="module")
def model():
    return glmjax.load_pretrained(GOLDEN / "indexshare_pattern", options=glmjax.ModelOptions(q_block=16))


def test_batched_left_padded_decode_equals_single_prompt_decode(model):
    prompts = [[3, 14, 15, 92, 65, 35, 89, 79, 32, 38, 46], [26, 43, 38, 32]]
    batched = greedy_decode_reference(model, prompts, 6)
    singles = [greedy_decode_reference(model, [p], 6)[0] for p in prompts]
    assert batched == singles
    # Each token is the argmax of a plain forward over prompt + tokens so far (jitted: a compile per length
    # takes a third of the time of running the model op by op).
    forward = nnx.jit(lambda m, i: m(i).logits)
    for p, gen in zip(prompts, singles, strict=True):
        seq = p + gen
        logits = np.asarray(forward(model, jnp.asarray([seq], jnp.int32))[0])
        assert [int(t) for t in logits[len(p) - 1:-1].argmax(-1)] == gen


def test_eos_stops_a_row(model):
    prompt = [3, 14, 15, 92, 65]
    free = greedy_decode_reference(model, [prompt], 5)[0]
    stopped = greedy_decode_reference(model, [prompt], 5, eos_token_ids=[free[1]])[0]
    assert stopped == free[: free.index(free[1]) + 1]
