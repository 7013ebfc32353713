# Two commands do all set-up on a fresh machine with Python 3.11:
#   make demo   # creates .venv from the lock if missing, then runs the CPU demo
#   make test   # creates .venv (plus test-only deps), runs the fast suite
PY ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PYTHON := $(VENV)/bin/python
PIP := $(PYTHON) -m pip --disable-pip-version-check -q
CORE := $(VENV)/.core-installed
TESTDEPS := $(VENV)/.test-installed
PYTEST_ARGS ?=
# glibc's malloc gives XLA:CPU's large per-step buffers fresh mmaps whose pages fault
# in on every step (28k minor faults per step of the demo's SuTI training). Backed by
# transparent huge pages (glibc >= 2.35; older ones ignore the tunable) they fault
# about 400 times: that step used 8% less CPU (bench/page_faults.py). Appended to any
# GLIBC_TUNABLES already set; numerics are unchanged. The tests (many short processes,
# not measured with it) run without it.
RUN_ENV = GLIBC_TUNABLES=$${GLIBC_TUNABLES:+$$GLIBC_TUNABLES:}glibc.malloc.hugetlb=1
# Pytest exits 5 when nothing was collected: not a failure for a filtered run.
RUN_PYTEST = rc=0; $(PYTHON) -m pytest $(1) $(PYTEST_ARGS) || rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest: no tests collected"; rc=0; fi; exit $$rc

.PHONY: demo test test-slow test-all bench aot venv clean

venv: $(CORE)

$(CORE): requirements.lock setup.py
	test -x $(PYTHON) || $(PY) -m venv $(VENV)
	$(PIP) install --no-deps -r requirements.lock
	$(PIP) install --no-deps --no-build-isolation -e .
	touch $@

# torch (CPU, test-only: parity against reference implementations).
$(TESTDEPS): $(CORE) requirements-test.lock
	$(PIP) install --no-deps -r requirements-test.lock
	touch $@

# RETRAIN=base,sr,judges trains those shipped artefacts (pretrained/demo_*) from scratch.
# The demo is the CPU demo: JAX_PLATFORMS=cpu keeps libtpu (installed by the test lock
# for AOT tests) from probing for a TPU; set JAX_PLATFORMS to override.
demo: $(CORE)
	$(RUN_ENV) JAX_PLATFORMS=$${JAX_PLATFORMS:-cpu} $(PYTHON) -m launch.demo $(if $(RETRAIN),--retrain=$(RETRAIN))

test: $(TESTDEPS)
	@$(call RUN_PYTEST,-n 2 tests)

test-slow: $(TESTDEPS)
	@$(call RUN_PYTEST,-m slow tests)

test-all: $(TESTDEPS)
	@$(call RUN_PYTEST,-m "slow or not slow" -n 2 tests)

# Peer libraries (imagen-pytorch, diffusers) live in their own venv, built on first use.
bench: $(TESTDEPS)
	test -x .venv-bench/bin/python || bash bench/setup_peers.sh
	$(RUN_ENV) $(PYTHON) -m bench.run_all

# Ahead-of-time compiles of the paper-size SuTI train steps for TPU pod slices
# (libtpu from the test lock; no TPU needed): reports/aot/<stage>_<topology>.json
# with per-chip bytes vs HBM, FLOPs and compile seconds. v5p-128 and v4-128 are
# 64 chips (4x4x4), v5litepod-256 is 16x16. fsdp=16, data fills the rest: params
# are then <1% over an even split (pure fsdp=256 leaves suti_sr256 78% over, and
# 64 does not map onto a 16x16 slice). The pod path trains on precomputed T5
# embeddings (launch.embed_text), so the compiled step holds no T5; the compile
# reads no weights, the path only names the encoder that wrote the embeddings.
# Many minutes per paper-size compile on 2 cores; suti_base64 on v4 peaks at 22 GiB
# of host memory (add swap on a machine with less than 32 GiB: README). The tiny check:
#   make aot AOT_ARG=:tiny AOT_TOPOLOGIES=v5e:2x2 AOT_FLAGS=--config.mesh.ici_fsdp=4
AOT_CONFIGS ?= suti_base64 suti_sr256
AOT_TOPOLOGIES ?= v5p:4x4x4 v4:4x4x4 v5e:16x16
AOT_ARG ?=
AOT_FLAGS ?= --config.mesh.ici_fsdp=16 --config.data.precomputed_embeddings=True \
	--config.text.weights_path=weights/t5xxl
# Gradient-accumulation microbatches (config@topology=N; 1 where not listed) where
# the batch of 2048 does not fit one pass: chosen so the step fits the chip's HBM.
AOT_ACCUM ?= suti_sr256@v5p:4x4x4=4 suti_base64@v4:4x4x4=4 suti_sr256@v4:4x4x4=16 \
	suti_base64@v5e:16x16=4 suti_sr256@v5e:16x16=8
aot: $(TESTDEPS)
	@mkdir -p reports/aot; rc=0; for c in $(AOT_CONFIGS); do for t in $(AOT_TOPOLOGIES); do \
	  accum=1; for p in $(AOT_ACCUM); do case $$p in "$$c@$$t="*) accum=$${p#*=};; esac; done; \
	  out=reports/aot/$$c$$(echo "$(AOT_ARG)" | tr : _)_$$(echo $$t | tr : _).json; \
	  JAX_PLATFORMS=cpu $(PYTHON) -m launch.compile_aot --config=configs/$$c.py$(AOT_ARG) \
	    --topology=$$t --config.mesh.ici_data=-1 --config.optimizer.grad_accum_steps=$$accum \
	    $(AOT_FLAGS) --report=$$out || rc=1; \
	done; done; exit $$rc

clean:
	rm -rf $(VENV) reports workdirs
