# Two commands set everything up from a bare Python: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test lint bench clean tiny-checkpoints browser

$(STAMP): requirements.txt pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) scripts/demo.py --output_dir outputs/demo --num_prompts 20

lint: $(STAMP)
	$(PY) -m ruff check .

# Debian's headless Chromium + ChromeDriver for tests/test_app_browser.py (apt-get as root; instant when present).
browser:
	sh scripts/ci/install_browser.sh

test: $(STAMP) browser
	$(PY) -m ruff check .
	$(PY) -m pytest -n 2 --dist=loadfile -q

bench: $(STAMP)
	$(PY) bench/cross_method.py

# Retrain the shipped tiny towers and baseline from scratch on the digits world (about 25 minutes on 2 cores).
TINY_RUNS := outputs/tiny
tiny-checkpoints: $(STAMP)
	$(PY) datasets/digits.py --output_dir data/digits
	$(PY) scripts/train_vae.py --config configs/baseline/vae.yaml --train_data_dir data/digits/train \
		--output_dir $(TINY_RUNS)/vae_run
	rm -rf ckpt/tiny/vae && cp -r $(TINY_RUNS)/vae_run/vae ckpt/tiny/vae
	$(PY) scripts/train_clip.py --config configs/baseline/clip.yaml --train_data_dir data/digits/train \
		--output_dir $(TINY_RUNS)/clip_run
	rm -rf ckpt/tiny/clip && cp -r $(TINY_RUNS)/clip_run/clip ckpt/tiny/clip
	$(PY) scripts/train_text_to_image.py --config configs/baseline/tiny.yaml --train_data_dir data/digits/train \
		--output_dir $(TINY_RUNS)/baseline_run
	rm -rf ckpt/tiny/baseline && cp -r $(TINY_RUNS)/baseline_run/pipeline ckpt/tiny/baseline

clean:
	rm -rf outputs .pytest_cache .ruff_cache
