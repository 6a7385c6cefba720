# herald: the two commands a newcomer needs are `make demo` and `make test`.
SHELL := /bin/bash
.DEFAULT_GOAL := help

export DATABASE_URL ?= postgres://root@127.0.0.1:5432/postgres
export HERALD_DATABASE_URL ?= postgres://root@127.0.0.1:5432/herald
export REDIS_URL ?= redis://127.0.0.1:6379
CARGO ?= cargo

.PHONY: help up down status build demo test test-scale fmt lint

help: ## List the targets.
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-14s %s\n", $$1, $$2}'

up: ## Start local Redis and PostgreSQL if they are not running (installs them if absent).
	@scripts/services.sh up

down: ## Stop the services `make up` started (never ones it found running).
	@scripts/services.sh down

status: ## Say whether Redis and PostgreSQL answer.
	@scripts/services.sh status

demo: ## Daily VA assignment end to end: services, workers, Airtable fake, progress bar (knobs: scripts/demo.sh).
	@scripts/demo.sh

build: ## Build every binary (release).
	$(CARGO) build --release --workspace --bins

fmt: ## Format the code.
	$(CARGO) fmt --all

lint: ## fmt check + clippy with warnings as errors.
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets --locked -- -D warnings

test: up lint ## fmt check, clippy -D warnings, then every test against real Redis and Postgres.
	$(CARGO) build --workspace --bins --locked
	$(CARGO) test --workspace --locked -- --test-threads=2

test-scale: up ## The 1,000,000-due-jobs backlog drain (minutes; not part of make test).
	$(CARGO) build --release --workspace --bins --locked
	HERALD_BACKLOG_JOBS=1000000 $(CARGO) test --release --locked -p herald-tests --test backlog -- --nocapture

.PHONY: bench bench-queue bench-assign bench-calls bench-send
bench: bench-queue bench-assign bench-calls bench-send ## Every benchmark (ratios against a peer measured in the same run).

bench-queue: up ## herald vs BullMQ: bulk enqueue, processing at c=1 and c=50, idle pickup latency.
	@scripts/bench-queue.sh

bench-assign: up ## Daily assignment: select + distribute 14,400 of 1,000,000 profiles; sync of 1,440 records at 5 req/s vs its floor.
	$(CARGO) build --release --locked -p herald-bench -p herald-worker --bin herald-bench-assign --bin herald-worker
	$${CARGO_TARGET_DIR:-target}/release/herald-bench-assign $(BENCH_ASSIGN_ARGS)

bench-calls: up ## Call campaigns: slot reuse latency (webhook to next call at the Vapi fake) and limit checks, real engine.
	$(CARGO) run --release --locked -p herald-bench --bin herald-bench-calls -- $(BENCH_CALLS_ARGS)

bench-send: up ## WhatsApp sends: 10,000 recipients at 50 msg/s (error vs configured) and at 1,000 msg/s with two workers, real worker processes and the Meta fake.
	$(CARGO) build --release --locked -p herald-bench -p herald-worker --bin herald-bench-send --bin herald-worker
	$${CARGO_TARGET_DIR:-target}/release/herald-bench-send $(BENCH_SEND_ARGS)
