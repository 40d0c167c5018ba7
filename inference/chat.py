"""`loom chat`: a multi-turn chat in the terminal that streams each answer as it is generated.

Type a message and Enter. `clear` forgets the history, `exit` (or end of input) leaves. With `--tools FILE` (a JSON
list of function schemas) the model may answer with a tool call: it is printed parsed, and the next line you type is
that tool's result (an observation), as the template formats it.
"""

from __future__ import annotations

import json
import sys
from typing import TextIO

from orchestrator.data.tools import FunctionCall

from .engine import Conversation, Engine, Sampling

HELP = "Type a message; 'clear' forgets the history, 'exit' leaves."


def show_calls(calls: list[FunctionCall]) -> str:
    return "\n".join(f"Tool call: {call.name}({call.arguments})" for call in calls)


def chat_loop(engine: Engine, sampling: Sampling, system: str | None = None, tools: str | None = None,
              read: TextIO = sys.stdin, write: TextIO = sys.stdout) -> None:  # fmt: skip
    history: list[dict[str, str]] = []
    awaiting_result = False
    write.write(HELP + "\n")
    while True:
        write.write("\nTool result: " if awaiting_result else "\nUser: ")
        write.flush()
        line = read.readline()
        if not line:  # end of input
            write.write("\n")
            return
        text = line.strip()
        if text == "exit":
            return
        if text == "clear":
            history, awaiting_result = [], False
            write.write("History cleared.\n")
            continue
        if not text:
            continue
        history.append({"role": "observation" if awaiting_result else "user", "content": text})
        talk = Conversation(list(history), system, tools)
        write.write("Assistant: ")
        if tools:  # a tool call is only known once the answer is whole
            reply = engine.chat(talk, sampling)[0]
            answer = reply.text
            if reply.tool_calls:
                write.write(show_calls(reply.tool_calls) + "\n")
                calls = [{"name": c.name, "arguments": json.loads(c.arguments)} for c in reply.tool_calls]
                history.append({"role": "function", "content": json.dumps(calls, ensure_ascii=False)})
                awaiting_result = True
                continue
            write.write(answer)
        else:
            pieces = []
            for delta in engine.stream(talk, sampling):
                pieces.append(delta)
                write.write(delta)
                write.flush()
            answer = "".join(pieces)
        write.write("\n")
        history.append({"role": "assistant", "content": answer})
        awaiting_result = False
