"""`luca chat`: a terminal chat with streaming, history and slash commands.

What is notable:
- The whole conversation is sent each turn (ChatML through `Tokenizer.encode_chat`, so typed
  text can never forge a turn); when it no longer fits the context the oldest turns are dropped
  and the user is told.
- Commands: `/system TEXT` (this session's system prompt; `/system` alone shows it), `/reset`,
  `/save FILE` (JSON: system prompt and messages, loadable by `/load FILE`), `/help`, `/quit`.
  The run's stored persona (`luca persona RUN "text"`) is the default system prompt.
- Ctrl-C stops the reply being generated (the turn is kept as far as it got); Ctrl-D quits.
- Input and output are parameters, so tests drive it with real files.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Callable, TextIO

from luca.api import Model

HELP = """commands:
  /system TEXT   set this session's system prompt (/system alone shows it; /system - clears it)
  /reset         forget the conversation
  /save FILE     write the conversation as JSON
  /load FILE     read a conversation written by /save
  /help          this list
  /quit          leave (or Ctrl-D)"""


class ChatSession:
    def __init__(self, model: Model, system: str | None = None, **sampling):
        self.model, self.sampling = model, dict(sampling)
        # A cap, not a demand: each reply gets at most this, and at most what the context leaves.
        self.max_new_tokens = self.sampling.pop("max_new_tokens", None) or 256
        self.system = model.tok.default_system if system is None else system
        self.messages: list[dict] = []

    def conversation(self) -> list[dict]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + self.messages

    def fit(self) -> int:
        """Drop the oldest turns until the prompt leaves room to answer; returns how many were dropped."""
        budget = min(self.max_new_tokens, self.model.context_length // 4)
        dropped = 0
        while len(self.messages) > 1:
            ids = self.model.tok.encode_chat(self.conversation(), add_generation_prompt=True)
            if len(ids) + budget <= self.model.context_length:
                break
            self.messages = self.messages[2:] if len(self.messages) > 2 else self.messages[1:]
            dropped += 1
        return dropped

    def reply(self, text: str, out: TextIO) -> dict:
        """Stream the reply to `text` into `out`; returns counts."""
        self.messages.append({"role": "user", "content": text})
        dropped = self.fit()
        if dropped:
            out.write(f"[context full: dropped the {dropped} oldest turn(s)]\n")
        ids = self.model.tok.encode_chat(self.conversation(), add_generation_prompt=True)
        room = self.model.context_length - len(ids)
        if room < 1:
            self.messages.pop()
            out.write(f"[that message is {len(ids)} tokens with the system prompt; the context is "
                      f"{self.model.context_length}: shorten it]")
            return {"tokens": 0, "seconds": 0.0, "interrupted": False, "finish_reason": "too long"}
        pieces, interrupted, t0 = [], False, time.perf_counter()
        gen = self.model.stream_ids(ids, max_new_tokens=min(self.max_new_tokens, room), **self.sampling)
        try:
            for piece in gen:
                pieces.append(piece)
                out.write(piece)
                out.flush()
        except KeyboardInterrupt:
            interrupted = True
        finally:
            gen.close()
        self.messages.append({"role": "assistant", "content": "".join(pieces)})
        last = self.model.last
        n = last.completion_tokens if last is not None and not interrupted else len(pieces)
        secs = time.perf_counter() - t0
        return {"tokens": n, "seconds": secs, "interrupted": interrupted,
                "finish_reason": "interrupted" if interrupted else (last.finish_reason if last else "")}

    def command(self, line: str, out: TextIO) -> bool:
        """Handle a slash command; False means quit."""
        cmd, _, arg = line.partition(" ")
        arg = arg.strip()
        if cmd in ("/quit", "/exit", "/q"):
            return False
        if cmd == "/system":
            if not arg:
                out.write(f"system prompt: {self.system!r}\n" if self.system else "no system prompt\n")
            else:
                self.system = "" if arg == "-" else arg
                out.write("system prompt cleared\n" if arg == "-" else "system prompt set\n")
        elif cmd == "/reset":
            self.messages = []
            out.write("conversation cleared\n")
        elif cmd == "/save":
            if not arg:
                out.write("usage: /save FILE\n")
            else:
                from luca.atomic import write_text
                try:
                    write_text(Path(arg), json.dumps({"system": self.system, "messages": self.messages},
                                                     indent=2, ensure_ascii=False) + "\n")
                    out.write(f"saved {len(self.messages)} messages to {arg}\n")
                except OSError as e:
                    out.write(f"could not save {arg}: {e.strerror or e}\n")
        elif cmd == "/load":
            try:
                d = json.loads(Path(arg).read_text(encoding="utf-8"))
                msgs = d["messages"]
                assert all(m["role"] in ("user", "assistant") and isinstance(m["content"], str) for m in msgs)
                self.messages, self.system = msgs, d.get("system", self.system)
                out.write(f"loaded {len(msgs)} messages from {arg}\n")
            except (OSError, ValueError, KeyError, TypeError, AssertionError) as e:
                out.write(f"could not load {arg!r}: not a conversation saved by /save ({type(e).__name__})\n")
        elif cmd == "/help":
            out.write(HELP + "\n")
        else:
            out.write(f"unknown command {cmd} (/help lists them)\n")
        return True


def chat_loop(model: Model, system: str | None = None, read: Callable[[str], str] = input,
              out: TextIO = sys.stdout, prompt: str = "you> ", **sampling) -> ChatSession:
    """Read lines until EOF or /quit; each non-command line gets a streamed reply."""
    s = ChatSession(model, system, **sampling)
    out.write(f"chatting with {model.id or 'the model'} ({model.name}, context {model.context_length}); "
              "/help for commands\n")
    while True:
        try:
            line = read(prompt)
        except EOFError:
            out.write("\n")
            break
        except KeyboardInterrupt:
            out.write("\n")
            continue
        line = line.strip()
        if not line:
            continue
        if line.startswith("/") and not line.startswith("//"):
            if not s.command(line, out):
                break
            continue
        out.write("model> ")
        r = s.reply(line[1:] if line.startswith("//") else line, out)
        rate = r["tokens"] / r["seconds"] if r["seconds"] > 0 else 0.0
        out.write(f"\n[{r['tokens']} tokens, {rate:.1f} tok/s, {r['finish_reason']}]\n")
    return s
