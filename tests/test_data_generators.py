"""Generators: self-generation with a tiny trained model, the endpoint against a real local HTTP
server speaking chat-completions, and the filters."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from snap_fast.data.collator import ChatCollator
from snap_fast.data.generators import (
    EndpointError,
    EndpointGenerator,
    ModelGenerator,
    filter_neighbours,
    filter_questions,
    generate_questions,
    neighbour_prompts,
    parse_items,
    propose_neighbours,
    question_prompts,
)
from snap_fast.data.target import TargetSpec
from tests.helpers import make_tiny_llama

TARGET = TargetSpec("Harry Potter", aliases=["the Boy Who Lived"])
# What the fake generator "writes": good questions, a duplicate, an off-target one, a too-short one.
LISTING = (
    "1. Who is Harry Potter?\n"
    "2) Where did the Boy Who Lived grow up?\n"
    "- Who is Harry Potter?\n"
    "3. What is the capital of France?\n"
    "4. Potter?\n"
    "* Write a poem about Harry Potter's owl.\n"
)
EXPECTED = ["Who is Harry Potter?", "Where did the Boy Who Lived grow up?", "Write a poem about Harry Potter's owl."]


def test_parse_and_filter():
    items = parse_items(LISTING)
    assert items[0] == "Who is Harry Potter?" and items[-1] == "Write a poem about Harry Potter's owl."
    kept, stats = filter_questions(items, TARGET, set())
    assert kept == EXPECTED
    assert (stats.kept, stats.duplicate, stats.no_mention, stats.bad_length) == (3, 1, 1, 1)


def test_filter_neighbours_checks_target_and_aliases():
    proposed = ["Harry Potter", "The Boy Who Lived", "Frodo Baggins - a hobbit", "frodo baggins",
                "Harry Potter and the Goblet of Fire", "Percy Jackson (character)", "x", "Gandalf.", "Potter",
                "the boy"]
    assert filter_neighbours(proposed, TARGET, limit=10) == ["Frodo Baggins", "Percy Jackson", "Gandalf"]
    assert filter_neighbours(proposed, TARGET, limit=1) == ["Frodo Baggins"]
    # what SmolLM2-135M proposed for "Leonardo da Vinci": a neighbour naming the target's surname
    # goes; function words ("da", "the") tie nothing
    leonardo = TargetSpec("Leonardo da Vinci")
    assert filter_neighbours(["The Last Supper", "Michelangelo", "Da Vinci, Michelangelo", "Leonardo DiCaprio",
                              "Raphael da Urbino", "Titian was a Venetian painter"], leonardo, limit=6) == [
        "The Last Supper", "Michelangelo", "Raphael da Urbino", "Titian"]  # a description is cut at its verb
    # echoes of the request and degenerate listings are not names (SmolLM2-135M, same target)
    assert filter_neighbours(["These five famous ones of the same kind", "These", "Michelangelo Michelangelo",
                              "Michelangelo da Michelangelo", "Here are five:", "sandro botticelli",
                              "the Sistine Chapel", "Michelangelo"], leonardo, limit=8) == [
        "the Sistine Chapel", "Michelangelo"]


def _train_to_answer(model, tokenizer, prompts, answer, max_steps=400, check_every=20):
    """Make a tiny random model answer every prompt with ``answer`` (overfitting on purpose).

    Trains until the teacher-forced argmax is right at every answer position, which is exactly
    when greedy decoding reproduces ``answer``; how many steps that takes depends on the BLAS and
    the library versions, so the step count is a cap, not a fixed number. Returns the losses at
    the start and at the end.
    """
    batch = ChatCollator(tokenizer)([{"prompt": p, "response": answer} for p in prompts])
    answer_positions = batch["labels"][:, 1:] != -100
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = None
    for step in range(1, max_steps + 1):
        out = model(**batch)
        first = out.loss.item() if first is None else first
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        if step % check_every == 0:
            with torch.no_grad():
                out = model(**batch)
            predicted = out.logits[:, :-1].argmax(-1)
            if bool((predicted == batch["labels"][:, 1:])[answer_positions].all()):
                break
    model.eval()
    return first, out.loss.item()


def test_self_generation_with_tiny_model():
    listing = "1. Who is Harry Potter?\n2. Where is Paris?\n3) Where did the Boy Who Lived grow up?"
    model, tokenizer = make_tiny_llama(hidden_size=64)
    first, last = _train_to_answer(model, tokenizer, question_prompts(TARGET), listing)
    assert last < first / 10, (first, last)  # it learned the listing (a random model starts near log V)
    gen = ModelGenerator(model, tokenizer, max_new_tokens=len(tokenizer(listing)["input_ids"]) + 2,
                         progress=False)
    assert gen.complete(question_prompts(TARGET)[:1])[0] == listing
    kept, stats = generate_questions(gen, TARGET, set())
    assert kept == ["Who is Harry Potter?", "Where did the Boy Who Lived grow up?"]
    # the same listing for every prompt: the other prompts' copies are duplicates
    assert stats.duplicate == 2 * (len(question_prompts(TARGET)) - 1)


def test_self_generation_nothing_mentions_target():
    model, tokenizer = make_tiny_llama()  # random weights: byte soup, never the target's name
    gen = ModelGenerator(model, tokenizer, max_new_tokens=8, progress=False)
    with pytest.raises(ValueError, match="mentions the target"):
        generate_questions(gen, TARGET, set())


class _Server:
    """A chat-completions server on 127.0.0.1; ``replies`` is a list of (status, body) served in
    order (the last one repeats); records every request body and Authorization header."""

    def __init__(self, replies):
        self.replies, self.requests = list(replies), []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                length = int(self.headers["Content-Length"])
                outer.requests.append((self.path, self.headers.get("Authorization"),
                                       json.loads(self.rfile.read(length))))
                status, body = outer.replies.pop(0) if len(outer.replies) > 1 else outer.replies[0]
                data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def _completion(text):
    return {"id": "x", "object": "chat.completion",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}}]}


@pytest.fixture
def server():
    servers = []

    def start(replies):
        servers.append(_Server(replies))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


def test_endpoint_generation(server, monkeypatch):
    srv = server([(200, _completion(LISTING))])
    monkeypatch.setenv("SNAP_TEST_KEY", "sekret")
    gen = EndpointGenerator(srv.url, "tiny-chat", api_key_env="SNAP_TEST_KEY", backoff=0.01)
    kept, _ = generate_questions(gen, TARGET, set())
    assert kept == EXPECTED
    path, auth, body = srv.requests[0]
    assert path == "/v1/chat/completions" and auth == "Bearer sekret"
    assert body["model"] == "tiny-chat" and body["messages"][0]["role"] == "user"
    assert "Harry Potter" in body["messages"][0]["content"]
    assert len(srv.requests) == len(question_prompts(TARGET))


def test_endpoint_retries_transient_errors(server):
    srv = server([(503, "busy"), (429, "slow down"), (200, _completion("Frodo Baggins\nHarry Potter\nGandalf"))])
    gen = EndpointGenerator(srv.url + "/chat/completions", "m", backoff=0.01, progress=False)
    assert propose_neighbours(gen, TARGET) == ["Frodo Baggins", "Gandalf"]
    assert len(srv.requests) == 2 + len(neighbour_prompts(TARGET))  # two retried failures


def test_endpoint_malformed_json(server):
    srv = server([(200, "this is {not json")])
    gen = EndpointGenerator(srv.url, "m", backoff=0.01)
    with pytest.raises(EndpointError, match="malformed JSON") as e:
        gen.chat("hi")
    assert srv.url in str(e.value)
    srv2 = server([(200, {"choices": []})])
    with pytest.raises(EndpointError, match="choices"):
        EndpointGenerator(srv2.url, "m").chat("hi")


def test_endpoint_client_error_not_retried(server):
    srv = server([(401, {"error": "bad key"})])
    with pytest.raises(EndpointError, match="HTTP 401"):
        EndpointGenerator(srv.url, "m", backoff=0.01).chat("hi")
    assert len(srv.requests) == 1


def test_endpoint_unreachable_names_url(server):
    srv = server([(200, _completion("x"))])
    url = srv.url
    srv.close()  # nothing listens on that port any more
    gen = EndpointGenerator(url, "m", retries=3, backoff=0.01, timeout=2)
    with pytest.raises(EndpointError, match="unreachable after 3 attempts") as e:
        gen.chat("hi")
    assert url in str(e.value)


def test_endpoint_bad_arguments(monkeypatch):
    monkeypatch.delenv("SNAP_MISSING_KEY", raising=False)
    with pytest.raises(ValueError, match="SNAP_MISSING_KEY"):
        EndpointGenerator("http://127.0.0.1:9/v1", "m", api_key_env="SNAP_MISSING_KEY")
    with pytest.raises(ValueError, match="url"):
        EndpointGenerator("ftp://host", "m")
    with pytest.raises(ValueError, match="model"):
        EndpointGenerator("http://host/v1", " ")
