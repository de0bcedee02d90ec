# Two commands set everything up from a bare Python: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test lint bench clean tiny-checkpoints tiny-pairs-checkpoints browser paper-smoke

# The editable install puts the repository root on sys.path (compat mode): with setuptools' default import hook, a
# script in scripts/ would import the namespace folder scripts/versatile/ instead of the package versatile/.
$(STAMP): requirements.txt pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e . --config-settings editable_mode=compat
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

# One training step and one sampling step of every configs/<method>/paper.yaml stage at full size on the CPU (random
# weights), time and peak RSS per stage into bench/results.md; a stage estimated over MAX_MEMORY_GB is skipped with the
# reason. Not part of `make test`: about an hour on 2 cores.
MAX_MEMORY_GB ?= 18
paper-smoke: $(STAMP)
	$(PY) scripts/ci/paper_smoke.py --max_memory_gb $(MAX_MEMORY_GB) --record

# Retrain the shipped tiny towers and baseline from scratch on the digits world (about 25 minutes on 2 cores). Each
# run writes its model into its output_dir (beside checkpoint-*/, logs/, validation/); only the model files are shipped.
TINY_RUNS := outputs/tiny
VAE_FILES := config.json diffusion_pytorch_model.safetensors
CLIP_FILES := open_clip_config.json open_clip_model.safetensors text_encoder tokenizer
PIPELINE_FILES := model_index.json scheduler text_encoder tokenizer unet vae
tiny-checkpoints: $(STAMP)
	$(PY) scripts/make_digits.py --output_dir data/digits
	$(PY) scripts/train_vae.py --config configs/baseline/vae.yaml --train_data_dir data/digits/train \
		--output_dir $(TINY_RUNS)/vae_run
	rm -rf ckpt/tiny/vae && mkdir -p ckpt/tiny/vae && cd $(TINY_RUNS)/vae_run && cp -r $(VAE_FILES) $(CURDIR)/ckpt/tiny/vae/
	$(PY) scripts/train_clip.py --config configs/baseline/clip.yaml --train_data_dir data/digits/train \
		--output_dir $(TINY_RUNS)/clip_run
	rm -rf ckpt/tiny/clip && mkdir -p ckpt/tiny/clip && cd $(TINY_RUNS)/clip_run && cp -r $(CLIP_FILES) $(CURDIR)/ckpt/tiny/clip/
	$(PY) scripts/train_text_to_image.py --config configs/baseline/tiny.yaml --train_data_dir data/digits/train \
		--output_dir $(TINY_RUNS)/baseline_run
	rm -rf ckpt/tiny/baseline && mkdir -p ckpt/tiny/baseline && cd $(TINY_RUNS)/baseline_run && \
		cp -r $(PIPELINE_FILES) $(CURDIR)/ckpt/tiny/baseline/

# The digits-pairs world's towers and baseline (ckpt/tiny/pairs/): the digits VAE fine-tuned on pairs, a CLIP and a
# baseline UNet trained from scratch on pair captions (about 60 minutes on a loaded 2-core machine).
PAIRS_RUNS := outputs/tiny_pairs
tiny-pairs-checkpoints: $(STAMP)
	$(PY) scripts/make_digits_pairs.py --output_dir data/digits_pairs
	$(PY) scripts/train_vae.py --config configs/baseline/pairs_vae.yaml --train_data_dir data/digits_pairs/train \
		--output_dir $(PAIRS_RUNS)/vae_run
	rm -rf ckpt/tiny/pairs/vae && mkdir -p ckpt/tiny/pairs/vae && cd $(PAIRS_RUNS)/vae_run && \
		cp -r $(VAE_FILES) $(CURDIR)/ckpt/tiny/pairs/vae/
	$(PY) scripts/train_clip.py --config configs/baseline/pairs_clip.yaml --train_data_dir data/digits_pairs/train \
		--output_dir $(PAIRS_RUNS)/clip_run
	rm -rf ckpt/tiny/pairs/clip && mkdir -p ckpt/tiny/pairs/clip && cd $(PAIRS_RUNS)/clip_run && \
		cp -r $(CLIP_FILES) $(CURDIR)/ckpt/tiny/pairs/clip/
	$(PY) scripts/train_text_to_image.py --config configs/baseline/pairs_tiny.yaml \
		--train_data_dir data/digits_pairs/train --output_dir $(PAIRS_RUNS)/baseline_run
	$(PY) scripts/train_text_to_image.py --config configs/baseline/pairs_tiny_continue.yaml \
		--pretrained_model_name_or_path $(PAIRS_RUNS)/baseline_run --train_data_dir data/digits_pairs/train \
		--output_dir $(PAIRS_RUNS)/baseline_run2
	$(PY) scripts/train_text_to_image.py --config configs/baseline/pairs_tiny_continue2.yaml \
		--pretrained_model_name_or_path $(PAIRS_RUNS)/baseline_run2 --train_data_dir data/digits_pairs/train \
		--output_dir $(PAIRS_RUNS)/baseline_run3
	rm -rf ckpt/tiny/pairs/baseline && mkdir -p ckpt/tiny/pairs/baseline && cd $(PAIRS_RUNS)/baseline_run3 && \
		cp -r $(PIPELINE_FILES) $(CURDIR)/ckpt/tiny/pairs/baseline/

clean:
	rm -rf outputs .pytest_cache .ruff_cache
