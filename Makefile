# Everyday commands (inside the venv made by README's set-up commands).
.PHONY: test lint format report bench demo env

test:           ## the test suite (kernels under TRITON_INTERPRET=1, tiny HF models)
	python -m pytest

lint:
	ruff check . && ruff format --check .

format:
	ruff format . && ruff check --fix .

report:         ## AOT compile every kernel for sm_80/sm_90: registers, spills, load width
	python -m benchmarks.kernel_report

bench:          ## microbenchmarks (Triton timings need a GPU) and plots
	python -m benchmarks.kernels && python -m benchmarks.plot

demo:
	soteria demo

env:
	python -m soteria.env_report
