"""One decode step through a quantized cache and through its by-hand twin, shared by the cache tests."""
import torch
from transformers import DynamicCache

from qlab.methods.kv.cache import QuantizedKVCache


@torch.no_grad()
def one_decode_step(model, method, rewrite, seed: int):
    """(logits through ``QuantizedKVCache(method)``, through a float ``DynamicCache`` whose layers' keys and
    values were replaced by ``rewrite(tensor, side, layer_idx)`` with side 'k' / 'v', and through the float
    cache) for one token after an 18-token prompt."""
    g = torch.Generator().manual_seed(seed)
    prompt, nxt = torch.randint(0, 256, (1, 18), generator=g), torch.randint(0, 256, (1, 1), generator=g)
    cache = QuantizedKVCache(method, model.config)
    model(prompt, past_key_values=cache, use_cache=True)
    got = model(nxt, past_key_values=cache, use_cache=True).logits
    by_hand, exact = DynamicCache(), DynamicCache()
    model(prompt, past_key_values=by_hand, use_cache=True)
    model(prompt, past_key_values=exact, use_cache=True)
    for i, layer in enumerate(by_hand.layers):
        layer.keys, layer.values = rewrite(layer.keys, "k", i), rewrite(layer.values, "v", i)
    want = model(nxt, past_key_values=by_hand, use_cache=True).logits
    return got, want, model(nxt, past_key_values=exact, use_cache=True).logits
