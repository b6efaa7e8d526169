"""The LLM path and prompt learning from Python: the real LiteLLM proxy (started by ci/test)
for the client and scorers, and a scripted OpenAI-compatible server (real HTTP) for the one test
whose model must answer as a function of the instruction."""

import json
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import hyperfunc as hf


def litellm_url():
    url = os.environ.get("HYPERFUNC_LLM_URL")
    if not url:
        pytest.fail("HYPERFUNC_LLM_URL is not set: run the suite with ci/test (it starts the peers)")
    return url


def test_client_chat_and_llm_hyperfunction_against_the_real_server():
    client = hf.LlmClient(litellm_url(), "sk-hf-free")
    assert client.chat("mock-gpt", "Say hello.") == "Hello from the mock."
    f = hf.llm("greeter", client, "mock-gpt", "Greet.", learn=False)
    assert f.prompt == "Greet." and f.param_names == []
    sys_ = hf.Chain([f])
    data = hf.examples([hf.Example(f"hi {i}", "hello from the mock") for i in range(3)])
    assert hf.evaluate(sys_, hf.Theta.init(sys_), data, hf.Scorer.exact_match()) == 1.0
    stats = client.stats()
    assert stats["total"]["calls"] == 4
    assert stats["by_label"]["greeter"]["calls"] == 3


def test_scorers_score_with_feedback():
    s, fb = hf.Scorer.exact_match().score("Paris", "paris.")
    assert s == 1.0
    s, fb = hf.Scorer.exact_match(case_sensitive=True).score("Paris", "paris")
    assert s == 0.0 and "paris" in fb
    s, fb = hf.Scorer.regex("([a-z").score("x", None)
    assert s == 0.0 and fb
    assert hf.Scorer.numeric_distance(max_distance=10).score("about 45", 50)[0] == pytest.approx(0.5)
    assert hf.Scorer.contains().score("the capital is Paris", "paris")[0] == 1.0


CAPITALS = {"France": "Paris", "Japan": "Tokyo", "Italy": "Rome", "Spain": "Madrid",
            "Egypt": "Cairo", "Kenya": "Nairobi", "Peru": "Lima", "Chile": "Santiago",
            "Greece": "Athens", "Norway": "Oslo"}


class Scripted(BaseHTTPRequestHandler):
    """Answers every question with MAGIC in the instruction, else only France's; proposes a
    WORSE instruction first, then a MAGIC one."""

    protocol_version = "HTTP/1.1"
    metas = []

    def log_message(self, *args):
        pass

    def do_POST(self):
        req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        system = req["messages"][0]["content"]
        user = req["messages"][-1]["content"]
        if "<current>" in user:
            Scripted.metas.append(user)
            text = ("<instruction>Answer. WORSE</instruction>" if len(Scripted.metas) == 1
                    else "<instruction>Name the capital. MAGIC</instruction>")
        else:
            country = next((c for c in CAPITALS if c in user), None)
            right = CAPITALS.get(country, "unknown")
            if "MAGIC" in system or country == "France":
                answer = right
            elif "WORSE" in system:
                answer = "no idea"
            else:
                answer = "Atlantis"
            text = json.dumps({"answer": answer})
        body = json.dumps({
            "id": "x", "object": "chat.completion", "created": 0, "model": req["model"],
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": text}}],
            "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7},
        }).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def scripted_url():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Scripted)
    Scripted.metas = []
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()


def test_prompt_learning_from_python_keeps_only_the_better_instruction(scripted_url):
    client = hf.LlmClient(scripted_url, "sk-fake")
    sig = hf.Signature("Answer the question.", [("question", "about geography")],
                       [("answer", "one word")])
    assert sig.render_user({"question": "Q?"}) == "question: Q?"
    qa = hf.predict("qa", client, "scripted", sig, learn_params=False)
    sys_ = hf.Chain([qa])
    data = hf.examples([hf.Example({"question": f"What is the capital of {c}?"}, a)
                        for c, a in CAPITALS.items()])
    theta = hf.Theta.init(sys_)
    scorer = hf.Scorer.exact_match()
    assert hf.evaluate(sys_, theta, data, scorer) == pytest.approx(0.1)
    learned, report = hf.optimize_prompts(sys_, theta, data, scorer, client, "scripted", seed=1)
    assert report["initial_score"] < 0.5
    assert report["final_score"] == 1.0
    assert report["stop"] == "no_feedback"
    rejected = [c for c in report["history"] if not c["accepted"]]
    assert len(rejected) == 1 and "WORSE" in rejected[0]["prompt"]
    assert "MAGIC" in learned.prompts()["qa"]
    assert hf.evaluate(sys_, learned, data, scorer) == 1.0
    assert "WORSE" in Scripted.metas[1]


def test_a_run_token_budget_stops_optimize_and_is_a_live_setting(tmp_path):
    client = hf.LlmClient(litellm_url(), "sk-hf-free", cache=False)
    sys_ = hf.Chain([hf.llm("greeter", client, "mock-gpt", "Greet.")])
    data = hf.examples([hf.Example("hi", "hello from the mock")])
    store = hf.RunStore(str(tmp_path))
    kw = dict(pop_size=4, progress=False, llm_clients=[client], store=str(tmp_path))
    probe = hf.optimize(sys_, data, hf.Scorer.exact_match(), generations=1, **kw)
    per_gen = store.generations(probe.run)[0]["tokens"]
    assert per_gen > 0
    r = hf.optimize(sys_, data, hf.Scorer.exact_match(), generations=50,
                    max_tokens=3 * per_gen, **kw)
    assert r.stop == "budget" and len(r.history) == 3
    assert store.generations(r.run)[-1]["tokens"] == 3 * per_gen
    assert store.effective_config(r.run)["max_tokens"] == 3 * per_gen
    with pytest.raises(hf.ConfigError, match="Es::llm_client"):
        hf.optimize(sys_, data, hf.Scorer.exact_match(), generations=2, progress=False,
                    max_tokens=10)
