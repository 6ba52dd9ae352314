"""Iterative rewrite against a real OpenAI-compatible server on loopback."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pandas as pd
import pytest

from damoc.data.rewrite import Rewriter, key_tokens, parse_question, parse_reply, passes_checks

REPLIES = {  # answer in the prompt -> what the "writer" proposes
    "The answer is 42.": "Instruction: What is six times seven?\nInput:\nAnswer: The answer is 42.",
    "Paris is the capital of France.": "Instruction: Capital?\nInput:\nAnswer: It is the capital.",
    "Blue.": "Sure! Here is a better version.",
    "Tokyo.": "Japan's capital is Tokyo.",  # not the sample's form: asked again for the question alone
}
QUESTIONS = {  # question in a question-only prompt -> the reply
    "Sky colour?": "\n  \n",  # nothing: an unreadable reply
    "Which city, of all of them, is the capital of Japan?": '"What is the capital of Japan?"',
}


class Writer(BaseHTTPRequestHandler):
    calls = 0

    def do_POST(self):  # noqa: N802 - http.server's name
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        prompt = body["messages"][0]["content"]
        Writer.calls += 1
        if "Answer: " in prompt:
            answer = prompt.rsplit("Answer: ", 1)[1].strip()
            text = REPLIES.get(answer, f"Instruction: x\nInput:\nAnswer: {answer}")
        else:
            text = QUESTIONS.get(prompt.rsplit("\n\n", 1)[1], "")
        data = json.dumps({"choices": [{"message": {"role": "assistant", "content": text}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def endpoint():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Writer)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_checks():
    old = {"instruction": "Please tell me what six times seven is", "input": "", "output": "The answer is 42."}
    assert key_tokens(old["output"]) == {"The", "42"}
    good = parse_reply("Instruction: What is 6x7?\nInput:\nAnswer: The answer is 42.")
    assert good == {"instruction": "What is 6x7?", "input": "", "output": "The answer is 42."}
    assert passes_checks(old, good, 0.3, 1.2) is None
    assert passes_checks(old, {**good, "output": "The answer is 41."}, 0.3, 1.2).startswith("answer lost")
    assert passes_checks(old, old, 0.3, 1.2) == "unchanged"
    assert passes_checks(old, {**good, "instruction": ""}, 0.3, 1.2) == "empty instruction"
    assert parse_reply("no fields here") is None
    # what writers really send: other names, bold labels, no input (the old one stays), a field said twice
    assert parse_reply("**Question:** What is 6x7?\nOutput: The answer is 42.", old) == good
    assert parse_reply("Instruction: A?\nOutput: 1\nOutput: 2") is None
    assert parse_question('Rewritten question: "What is 6x7?" It is 42.') == "What is 6x7?"
    assert parse_question("\n'What is 6x7?'\nMore.") == "What is 6x7?" and parse_question("  ") is None
    # the answer moved into the prompt makes it "easier" for the reference LM: refused before that check
    abspath = {"instruction": "What does os.path.abspath do?", "input": "", "output": "Return an absolute path."}
    moved = {**abspath, "instruction": "os.path.abspath: Return absolute path."}
    assert passes_checks(abspath, moved, 0.3, 1.2) == "answer leaked into the prompt"
    assert passes_checks(abspath, {**abspath, "instruction": "What does abspath return?"}, 0.3, 1.2) is None


def test_rewrite_accepts_only_what_passes(endpoint, lookup_model):
    rw = Rewriter(str(lookup_model), model="writer", endpoint=endpoint, rounds=3, max_loss_increase=100.0)
    df = pd.DataFrame({
        "instruction": ["Please, could you tell me what six times seven is, if you would?",
                        "Which city is the capital of France?", "Sky colour?",
                        "Which city, of all of them, is the capital of Japan?"],
        "input": ["", "", "", ""],
        "output": ["The answer is 42.", "Paris is the capital of France.", "Blue.", "Tokyo."]})
    Writer.calls = 0
    out = rw(df.copy())
    assert out["instruction"].tolist() == ["What is six times seven?", "Which city is the capital of France?",
                                           "Sky colour?", "What is the capital of Japan?"]
    assert out["output"].tolist() == df["output"].tolist()  # "Paris" was lost: that proposal was refused
    assert out["rewrite_rounds"].tolist() == [1, 0, 0, 1]
    outcomes = [json.loads(x)["outcomes"][0] for x in out["rewrite_log"]]
    assert outcomes == ["accepted", "answer lost ['France', 'Paris']", "unreadable reply", "accepted"]
    # round 2 accepted nothing (the same text again), so round 3 never ran; the two replies not in the
    # sample's form were asked again for the question alone in each round
    assert Writer.calls == 2 * (4 + 2)


def test_reference_loss_check_refuses_worse_answers(endpoint, lookup_model):
    rw = Rewriter(str(lookup_model), model="writer", endpoint=endpoint, rounds=1, max_loss_increase=-100.0)
    df = pd.DataFrame({"instruction": ["Please, what is six times seven?"], "input": [""],
                       "output": ["The answer is 42."]})
    assert rw(df.copy())["rewrite_rounds"].tolist() == [0]


def test_unreachable_endpoint_keeps_the_text(lookup_model):
    rw = Rewriter(str(lookup_model), model="w", endpoint="http://127.0.0.1:9", rounds=2)
    df = pd.DataFrame({"instruction": ["Q?"], "input": [""], "output": ["A."]})
    out = rw(df.copy())
    assert out["instruction"].tolist() == ["Q?"] and out["rewrite_rounds"].tolist() == [0]
