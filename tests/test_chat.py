"""``ChatSession`` and the ``jaxkv chat`` command.

* ``ChatSession`` on ``Model.tiny()`` (random weights, the real tokenizer): stopping a reply,
  dropping the oldest turns, the contiguous cache against the paged one, save and load.
* The command in-process on the bundled model (``cached_model``): messages that cannot be sent,
  the slash commands, ``--quiet``; stdin is a text stream, so the plain (non-terminal) path.
* The command in a real terminal (``pexpect``): readline editing, Ctrl-C during a reply and at
  the prompt, the prompt kept off stdout. Each of these loads the model in a subprocess.
"""

from __future__ import annotations

import io
import json
import os
import pathlib
import re
import shlex
import signal
import sys

import pexpect
import pytest

from jaxkv import cli
from jaxkv.engine import ChatSession, Model, SamplingParams

ROOT = pathlib.Path(__file__).parents[1]


@pytest.fixture(scope="module")
def tiny() -> Model:
    return Model.tiny()


def _session(tiny: Model, **kwargs) -> ChatSession:
    kwargs.setdefault("max_length", 128)
    return ChatSession(tiny, **kwargs)


def _stop_after(pieces: int, how: str = "raise"):
    """An ``on_text`` that stops the reply at its ``pieces``-th piece: by raising
    ``KeyboardInterrupt``, or by sending this process a real SIGINT."""
    seen = []

    def on_text(piece: str) -> None:
        seen.append(piece)
        if len(seen) == pieces:
            if how == "raise":
                raise KeyboardInterrupt
            os.kill(os.getpid(), signal.SIGINT)

    return on_text


# -- ChatSession: stopping a reply -----------------------------------------------------------


@pytest.fixture
def default_sigint():
    """Python's own SIGINT handler (a test runner may have put one of its own in place), which
    is the one ``ChatSession.send`` holds back."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.mark.parametrize("how", ["raise", "signal"])
def test_a_stopped_reply_is_kept_and_the_session_goes_on(tiny, how, default_sigint):
    session = _session(tiny, system="Be brief.")
    session.send("Hello", max_new_tokens=8)
    reply = session.send("Tell me more", max_new_tokens=60, on_text=_stop_after(3, how))
    assert session.last_finish_reason == "abort"
    assert 3 <= session.last_reply_tokens < 60
    assert session.messages[-1] == {"role": "assistant", "content": reply}
    assert session.messages[-2] == {"role": "user", "content": "Tell me more"}
    assert session.turns == 2
    assert not session.engine.has_unfinished()
    # The engine and the cache are consistent: the next turn works and reuses the cache.
    session.send("Again", max_new_tokens=8)
    assert session.last_finish_reason in ("eos", "length", "stop")
    assert session.last_reused_tokens > 0
    assert session.turns == 3


def test_a_reply_stopped_before_any_token_leaves_the_conversation(tiny, monkeypatch):
    session = _session(tiny)
    session.send("Hello", max_new_tokens=4)
    messages, cached = list(session.messages), session.cached_ids
    step = session.engine.step
    calls = []

    def interrupted_step():
        calls.append(1)
        if len(calls) == 1:
            raise KeyboardInterrupt  # lands before the first step runs
        return step()

    monkeypatch.setattr(session.engine, "step", interrupted_step)
    assert session.send("Hi again", max_new_tokens=8) == ""
    assert session.last_finish_reason == "abort"
    assert (session.messages, session.cached_ids) == (messages, cached)
    monkeypatch.undo()
    session.send("Hi again", max_new_tokens=4)
    assert session.turns == 2


def test_a_ctrl_c_before_the_message_is_sent_sends_nothing(tiny, monkeypatch, default_sigint):
    session = _session(tiny)
    session.send("Hello", max_new_tokens=4)
    messages, steps = list(session.messages), session.engine.stats().num_steps
    fit = session._fit

    def interrupted_fit(*args):
        os.kill(os.getpid(), signal.SIGINT)  # held back until the session looks
        return fit(*args)

    monkeypatch.setattr(session, "_fit", interrupted_fit)
    assert session.send("Hi again", max_new_tokens=8) == ""
    assert session.last_finish_reason == "abort"
    assert session.messages == messages and session.engine.stats().num_steps == steps
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


# -- ChatSession: a conversation that outgrows the cache -------------------------------------


def test_the_oldest_turns_are_dropped_to_fit(tiny):
    session = _session(tiny, system="You are a terse assistant.", drop_old_turns=True)
    dropped = []
    for number in range(8):
        session.send(f"Message number {number}, please answer.", max_new_tokens=16)
        dropped.append(session.last_dropped_turns)
        prompt = tiny.tokenizer.encode_chat(session.messages[:-1])
        assert len(prompt) + 16 <= session.max_length
    assert sum(dropped) > 0
    assert session.messages[0] == {"role": "system", "content": "You are a terse assistant."}
    assert session.messages[-2]["content"] == "Message number 7, please answer."
    assert [m["role"] for m in session.messages[1:]] == ["user", "assistant"] * session.turns
    assert session.turns < 8


def test_a_message_too_long_alone_is_refused_and_the_conversation_kept(tiny):
    session = _session(tiny, system="Be brief.", drop_old_turns=True)
    session.send("Hello", max_new_tokens=8)
    messages, cached = list(session.messages), session.cached_ids
    with pytest.raises(ValueError, match=r"every earlier turn dropped\) plus max_new_tokens=8"):
        session.send("word " * 200, max_new_tokens=8)
    assert (session.messages, session.cached_ids) == (messages, cached)


def test_without_dropping_a_full_conversation_is_refused(tiny):
    session = _session(tiny)
    with pytest.raises(ValueError, match="would pass the cache's max_length=128"):
        for number in range(20):
            session.send(f"Message number {number}, please answer.", max_new_tokens=16)
    assert session.turns > 0


# -- ChatSession: caches, conversation edits, files ------------------------------------------


def test_contiguous_gives_the_paged_replies_and_prefills_everything(tiny):
    paged = _session(tiny, system="Be brief.")
    contiguous = _session(tiny, system="Be brief.", cache="contiguous")
    for text in ("Hello there", "What is two plus two?", "Thanks"):
        assert contiguous.send(text, max_new_tokens=10) == paged.send(text, max_new_tokens=10)
        assert contiguous.last_reused_tokens == 0
        assert contiguous.last_prefill_tokens == len(
            tiny.tokenizer.encode_chat(contiguous.messages[:-1])
        )
    assert paged.last_reused_tokens > 0
    assert contiguous.messages == paged.messages


def test_the_cache_settings_reach_the_engine(tiny):
    session = _session(tiny, cache="contiguous", kv_quantization="int8")
    config = session.engine.cache_config
    assert (config.kind, config.kv_quantization) == ("contiguous", "int8")
    assert session.settings()["kv_quantization"] == "int8"


def test_reset_and_system(tiny):
    session = _session(tiny, system="First.")
    session.send("Hello", max_new_tokens=4)
    session.system = "Second."
    assert session.system == "Second." and session.turns == 1
    session.reset()
    assert session.messages == [{"role": "system", "content": "Second."}]
    assert session.cached_ids == []
    session.system = None
    assert session.system is None and session.messages == []
    with pytest.raises(ValueError, match=r"system is not valid UTF-8 text: position 3"):
        session.system = "caf\udce9"
    with pytest.raises(TypeError, match="system must be a str, got int"):
        session.system = 3


def test_save_and_load_round_trip(tiny, tmp_path):
    session = _session(tiny, system="Be brief.", sampling=SamplingParams(temperature=0.5, seed=3))
    session.send("Hello", max_new_tokens=4)
    session.send("Bye", max_new_tokens=4)
    path = tmp_path / "chat.json"
    session.save(path, settings={"model": "tiny"})
    document = json.loads(path.read_text())
    assert document["format"] == "jaxkv-chat" and document["version"] == 1
    assert document["messages"] == session.messages
    assert document["settings"]["temperature"] == 0.5
    assert document["settings"]["max_length"] == 128
    assert document["settings"]["model"] == "tiny"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chat.json"]  # no temporary left
    other = _session(tiny)
    other.load(str(path))
    assert other.messages == session.messages and other.system == "Be brief."
    other.send("Again", max_new_tokens=4)  # a loaded conversation goes on
    assert other.turns == 3


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"{not json", "is not valid JSON (Expecting property name"),
        (b"\xff\xfe", "is not UTF-8 text (byte 0 is 0xFF)"),
        (b"[1, 2]", 'holds no conversation: expected a JSON object with a "messages" list, got a'),
        (b'{"format": "other", "messages": []}', "has \"format\": 'other', expected 'jaxkv-chat'"),
        (b'{"messages": {"role": "user"}}', "messages must be a list, got an object"),
        (b'{"messages": [{"role": "assistant", "content": "x"}]}', "expected role 'user'"),
        (b'{"messages": [{"role": "user", "content": 1}]}', '"content" must be a string'),
        (b'{"messages": [{"role": "user", "content": "x"}]}', "a user message with no reply"),
        (b'{"messages": ["hi"]}', 'must be an object with "role" and "content", got a string'),
        (b'{"messages": [{"role": "user", "content": "\\udcff"}]}', "not valid UTF-8 text"),
    ],
)
def test_load_refuses_what_is_not_a_conversation(tiny, tmp_path, content, message):
    session = _session(tiny, system="Be brief.")
    session.messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Hi"},
    ]
    kept = list(session.messages)
    path = tmp_path / "bad.json"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=re.escape(message)):
        session.load(path)
    assert session.messages == kept
    with pytest.raises(FileNotFoundError):
        session.load(tmp_path / "absent.json")
    assert session.messages == kept


def test_arguments_are_checked(tiny, tmp_path):
    with pytest.raises(
        ValueError, match=r"cache must be one of \('paged', 'contiguous'\), got 'x'"
    ):
        ChatSession(tiny, cache="x")
    with pytest.raises(TypeError, match="drop_old_turns must be a bool, got 'yes'"):
        ChatSession(tiny, drop_old_turns="yes")
    with pytest.raises(TypeError, match="sampling must be a SamplingParams or None, got dict"):
        ChatSession(tiny, sampling={})
    with pytest.raises(ValueError, match="kv_quantization must be one of .*, got 'int3'"):
        ChatSession(tiny, kv_quantization="int3")
    with pytest.raises(ValueError, match="page_size must be >= 1, got 0"):
        ChatSession(tiny, page_size=0)
    with pytest.raises(
        TypeError, match="model must be a jaxkv Model, Gemma3Model or HybridModel, got str"
    ):
        ChatSession("model.gguf")
    session = _session(tiny)
    with pytest.raises(TypeError, match="path must be a non-empty str or path, got 3"):
        session.save(3)
    with pytest.raises(TypeError, match="settings must be a mapping or None, got list"):
        session.save(tmp_path / "x.json", settings=[])
    with pytest.raises(TypeError, match="settings must hold JSON values"):
        session.save(tmp_path / "x.json", settings={"bad": object()})
    assert not list(tmp_path.iterdir())


# -- the command, in-process -----------------------------------------------------------------

CHAT = ["chat", "--max-length", "64", "--max-new-tokens", "4"]


def run(capsys, *argv: str) -> tuple[int, str, list[str]]:
    """(exit status, stdout, stderr lines) of ``jaxkv *argv``."""
    status = cli.main(list(argv))
    captured = capsys.readouterr()
    return status, captured.out, captured.err.splitlines()


def _stdin(monkeypatch, data: bytes) -> None:
    """Type ``data`` on stdin (a real text stream, strict UTF-8 like a terminal's)."""
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data), encoding="utf-8"))


def test_chat_survives_a_message_too_long_and_one_not_utf8(
    capsys, monkeypatch, cached_model, sessions
):
    too_long = b"word " * 80
    _stdin(monkeypatch, b"Hi\n" + too_long + b"\ncaf\xe9\nBye\n")
    status, out, err = run(capsys, *CHAT)
    assert status == 0
    errors = [line for line in err if "error:" in line]
    assert len(errors) == 2, err
    assert errors[0].startswith("> jaxkv chat: error: ChatSession.send: the conversation (")
    assert "would pass the cache's max_length=64" in errors[0]
    assert "U+DCE9 (the undecodable input byte 0xE9)" in errors[1]
    assert all(line.endswith("(message not sent; the conversation is kept)") for line in errors)
    assert "Traceback" not in "".join(err)
    (session,) = sessions
    assert [m["role"] for m in session.messages] == ["user", "assistant", "user", "assistant"]
    assert [session.messages[0]["content"], session.messages[2]["content"]] == ["Hi", "Bye"]
    prefills = [line for line in err if "[prefilled" in line]
    assert len(prefills) == 2
    # the second turn reused the cached first one: it prefilled only part of what is cached
    new, cached = (int(word) for word in prefills[1].split() if word.isdigit())
    assert new < cached == len(session.cached_ids)
    assert len(out.splitlines()) == 2  # one reply line per sent message


def test_chat_ends_at_end_of_input(capsys, monkeypatch, cached_model):
    _stdin(monkeypatch, b"")
    status, out, err = run(capsys, *CHAT)
    assert (status, out) == (0, "")
    assert not any("error" in line for line in err)


def test_chat_slash_commands(capsys, monkeypatch, cached_model, sessions, tmp_path):
    saved, corrupt = tmp_path / "saved.json", tmp_path / "corrupt.json"
    corrupt.write_text('{"messages": [{"role": "user"')
    typed = [
        "/help",
        "/system",
        "/system Answer in one word.",
        "Hi",
        "//etc is a folder",
        f"/save {saved}",
        "/bogus",
        "/stats",
        f"/load {corrupt}",
        f"/load {tmp_path / 'absent.json'}",
        "/save",
        "/reset now",
        "/reset",
        "/system",
        f"/load {saved}",
        "/stats",
    ]
    _stdin(monkeypatch, "\n".join(typed).encode() + b"\n")
    status, out, err = run(capsys, "chat", "--max-length", "128", "--max-new-tokens", "4")
    assert status == 0
    assert "Traceback" not in "\n".join(err)
    assert len(out.splitlines()) == 2  # stdout: the two replies, nothing else
    listing = "\n".join(err)
    for command in ("/reset", "/system [TEXT]", "/save FILE", "/load FILE", "/stats", "/help"):
        assert command in listing
    assert "> (no system prompt)" in err
    (session,) = sessions
    # `//` sent the text with one slash removed; commands were never sent
    assert [m["content"] for m in session.messages if m["role"] == "user"] == [
        "Hi",
        "/etc is a folder",
    ]
    assert session.system == "Answer in one word."
    document = json.loads(saved.read_text())
    assert document["messages"] == session.messages
    assert document["settings"]["max_new_tokens"] == 4
    assert document["settings"]["cache"] == "paged"
    errors = [line.removeprefix("> ") for line in err if "error:" in line]
    assert errors[0] == (
        "jaxkv chat: error: unknown command '/bogus'; the commands are /reset, /system, /save, "
        "/load, /stats, /help (start a message with // to send it with a leading /)"
    )
    assert errors[1].startswith(f"jaxkv chat: error: ChatSession.load: {corrupt} is not valid JSON")
    assert errors[1].endswith("(the conversation is kept)")
    assert "No such file or directory" in errors[2] and errors[2].endswith("is kept)")
    assert errors[3] == "jaxkv chat: error: /save needs a file: /save FILE"
    assert errors[4] == "jaxkv chat: error: /reset takes no argument, got 'now'"
    assert len(errors) == 5
    stats = re.findall(
        r"turns: (\d+)\ncache: (\d+) of 128 tokens \(paged, kv none\)\n(.*)", listing
    )
    # the second /stats came after /reset and /load: the two turns are back, none cached yet
    assert [(turns, cached) for turns, cached, _ in stats] == [("2", stats[0][1]), ("2", "0")]
    assert int(stats[0][1]) > 0
    assert re.fullmatch(
        r"last reply: prefilled \d+ new tokens, reused \d+ from the cache; \d+ tokens"
        r"( at [\d.]+ tokens/s)? \((eos|length|stop)\)",
        stats[0][2],
    )
    assert "> [conversation reset]" in err


def test_chat_drops_the_oldest_turns_with_a_notice(capsys, monkeypatch, cached_model, sessions):
    _stdin(monkeypatch, b"".join(b"Say %d.\n" % number for number in range(6)))
    status, out, err = run(capsys, *CHAT, "--system", "Be brief.")
    assert status == 0
    notices = [line.removeprefix("> ") for line in err if "context full" in line]
    assert notices and all(
        re.fullmatch(r"\[context full: dropped the (oldest turn|\d+ oldest turns)\]", line)
        for line in notices
    )
    (session,) = sessions
    assert session.system == "Be brief."
    assert session.messages[-2]["content"] == "Say 5."
    assert len(out.splitlines()) == 6


def test_chat_quiet(capsys, monkeypatch, cached_model):
    _stdin(monkeypatch, b"Hi\n/bogus\n\xff\n")
    status, out, err = run(capsys, *CHAT, "--quiet")
    assert status == 0
    assert len(out.splitlines()) == 1
    # only the prompts and the two errors: no banner, no notice
    assert len([line for line in err if "jaxkv chat: error: " in line]) == 2
    assert not any(re.match(r"(> )*(\[|jaxkv chat: type)", line) for line in err), err


def test_chat_help_documents_contiguous(capsys):
    with pytest.raises(SystemExit):
        cli._parser().parse_args(["chat", "--help"])
    flat = " ".join(capsys.readouterr().out.split())
    assert "--cache {contiguous,paged}" in flat and "(default: paged)" in flat
    assert "contiguous has no prefix reuse: every turn prefills the whole conversation" in flat
    assert "--kv-quantization" in flat


# -- the command in a terminal ----------------------------------------------------------------


# pexpect forks the test process (JAX's threads included) and the child execs at once: the
# deadlock Python warns of needs the child to take a lock another thread held.
_FORK_WARNING = pytest.mark.filterwarnings("ignore:os.fork\\(\\) was called:RuntimeWarning")


def _spawn(pexpect, argv: str, tmp_path: pathlib.Path):
    """``jaxkv chat`` in a pseudo-terminal, its stdout copied to ``tmp_path/stdout`` on the way
    (``tee -i`` ignores the Ctrl-Cs the terminal sends to the whole pipeline)."""
    stdout = shlex.quote(str(tmp_path / "stdout"))
    python = shlex.quote(sys.executable)
    command = f"set -o pipefail; {python} -m jaxkv chat {argv} | tee -i {stdout}"
    child = pexpect.spawn("bash", ["-c", command], cwd=str(ROOT), encoding="utf-8", timeout=120)
    child.logfile_read = io.StringIO()
    return child


@_FORK_WARNING
def test_chat_in_a_terminal(tmp_path):
    """Ctrl-C stops a reply and the session goes on; the line is edited with readline; the
    slash commands work over the terminal; the prompt stays off stdout; Ctrl-D exits 0."""
    saved = tmp_path / "conversation.json"
    child = _spawn(pexpect, "--max-length 512 --max-new-tokens 300 --temperature 0", tmp_path)
    try:
        child.expect_exact("> ")
        child.send("Write a long story about a brave dragon.\r")
        child.expect_exact("dragon.\r\n")
        child.expect(r"\w+\W+\w+")  # the reply has started
        child.send("\x03")
        child.expect_exact("[reply stopped]")
        child.expect_exact("> ")
        # Line editing: type, move the cursor left three times, insert a letter.
        child.send("Tell me abut\x1b[D\x1b[Do")
        child.send("\r")
        child.expect_exact(" in cache]")
        child.expect_exact("> ")
        child.send("/stats\r")
        child.expect(r"turns: 2\r\n.*reused (\d+) from the cache")
        assert int(child.match.group(1)) > 0  # the turn after the stopped one reused the cache
        child.expect_exact("> ")
        child.send(f"/save {saved}\r")
        child.expect_exact("[saved 2 turns to ")
        child.expect_exact("> ")
        child.send("/nope\r")
        child.expect_exact("unknown command '/nope'")
        child.expect_exact("> ")
        child.sendeof()
        child.expect(pexpect.EOF)
    finally:
        child.close()
    log = child.logfile_read.getvalue()
    assert child.exitstatus == 0, log
    messages = json.loads(saved.read_text())["messages"]
    assert [m["content"] for m in messages if m["role"] == "user"] == [
        "Write a long story about a brave dragon.",
        "Tell me about",
    ]
    stopped, reply = messages[1]["content"], messages[3]["content"]
    assert stopped
    # stdout: the replies, each on its line, and nothing else (no prompt, no notice)
    assert (tmp_path / "stdout").read_text() == f"{stopped}\n{reply}\n"
    assert "Traceback" not in log


@_FORK_WARNING
def test_chat_in_a_terminal_ctrl_c_at_the_prompt(tmp_path):
    """At the prompt Ctrl-C clears the line; a second one at an empty prompt exits 0. A
    conversation written elsewhere loads and goes on (here on the contiguous cache)."""
    saved = tmp_path / "conversation.json"
    saved.write_text(
        json.dumps(
            {
                "messages": [
                    {"role": "user", "content": "Hi, I am Ada."},
                    {"role": "assistant", "content": "Hello Ada!"},
                ]
            }
        )
    )
    child = _spawn(pexpect, "--max-length 256 --max-new-tokens 8 --cache contiguous", tmp_path)
    try:
        child.expect_exact("> ")
        child.send("\x03")  # at an empty prompt: a hint, and the session goes on
        child.expect_exact("[Ctrl-C again, Ctrl-D or an empty line ends the session]")
        child.expect_exact("> ")
        child.send(f"/load {saved}\r")
        child.expect_exact("[loaded 1 turn from ")
        child.expect_exact("> ")
        child.send("What is my name?\r")
        child.expect_exact(" in cache]")
        child.expect_exact("> ")
        child.send("never sent")
        child.expect_exact("never sent")  # readline has it on the line
        child.send("\x03")
        child.expect_exact("> ")
        child.send("\x03")  # the previous prompt ended with Ctrl-C too, and this line is empty
        child.expect(pexpect.EOF)
    finally:
        child.close()
    log = child.logfile_read.getvalue()
    assert child.exitstatus == 0, log
    assert log.count("Ctrl-C again") == 1  # the Ctrl-C that cleared a line needs no hint
    assert len((tmp_path / "stdout").read_text().splitlines()) == 1  # the one reply
