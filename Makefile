# Thin wrappers around scripts/; the scripts are the real entry points.
.PHONY: bootstrap check test demo services-stop

bootstrap:
	./scripts/bootstrap

check:
	./scripts/check

test:
	./scripts/test

demo:
	./scripts/demo

services-stop:
	./scripts/services stop
