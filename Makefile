# The two commands a newcomer needs: `make run` and `make test`. Each sets itself up first.
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.bootstrap-stamp
PROTOS := $(shell find protos -name '*.proto')

.PHONY: setup run test test-fidelity test-gpu lint bench bench-gpu serve serve-guidance serve-scene clean k8s-presets

setup: $(STAMP) gen/.stamp

$(STAMP): pyproject.toml scripts/bootstrap.sh
	scripts/bootstrap.sh
	touch $@

gen/.stamp: $(PROTOS) $(STAMP)
	PYBIN=$(PY) scripts/gen_protos.sh
	touch $@

# The main job on the embedded default: the local stack (guidance under Ray Serve, scene, orchestrator, local store)
# turns "a red torus" into out/<job>/model.glb with the analytic prior and the cpu-demo preset, then stops.
PROMPT ?= a red torus
run: setup
	$(VENV)/bin/magic3d generate "$(PROMPT)" --preset cpu-demo --out out
	@echo "web page (submit, watch, orbit results): 'make serve' serves it on http://127.0.0.1:8080/ and prints the address with its token"

test: setup lint
	$(PY) -m pytest -q

test-fidelity: setup  # cpu-demo jobs on the fidelity shapes, scored on the final GLB (minutes; not in `make test`)
	$(PY) -m pytest -q -s -m fidelity tests/test_fidelity.py

test-gpu: setup
	$(PY) -m pytest -q -m gpu tests/test_gpu_*.py  # GPU tests live in tests/test_gpu_*.py

# buf over the protos, ruff over the code, mypy over shared/ and the three servicers (files: [tool.mypy] in pyproject).
k8s-presets: setup  # deploy/k8s/presets.yaml (ConfigMap magic3d-presets) from deploy/config/presets.yaml
	$(PY) scripts/k8s_presets.py

lint: setup
	cd protos && ../$(VENV)/bin/buf lint
	$(VENV)/bin/ruff check services shared bench tests scripts
	$(VENV)/bin/mypy

bench-gpu:  # on the GPU machine (wheels in .whl/, gen/ carried): the GPU suite's table and JSON in $$OUT or out/bench
	bash bench/gpu/run.sh suite

bench: setup
	$(PY) -m bench.guidance_sds --json out/bench/guidance_sds.json
	$(PY) -m bench.coarse_step --json out/bench/coarse_step.json

serve-guidance: setup
	$(PY) -m services.guidance.standalone --config deploy/config/guidance.yaml

serve-scene: setup
	$(PY) -m services.scene.server --config deploy/config/scene.yaml

serve: setup
	$(VENV)/bin/magic3d serve

clean:
	rm -rf gen out .pytest_cache
