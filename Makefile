# make test: the whole suite (what CI runs).  make demo: fresh clone -> results, offline, on CPU.
PY ?= python

test:
	$(PY) -m pytest -q

.PHONY: test
