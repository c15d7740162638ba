"""Prometheus metrics of one worker process. Labels are bounded by configuration
(sources, strategies, reasons, outcomes); no personal data ever goes into a label."""

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        # What prometheus_client's default registry exports: process_* (CPU, memory, open
        # files, start time), python_info and python_gc_*.
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)
        self.messages = Counter(
            "leadrouter_messages", "Inbound messages settled, by outcome", ["outcome"], registry=r
        )
        self.assignments = Counter(
            "leadrouter_assignments",
            "Contacts assigned by this worker, by source and strategy",
            ["source", "strategy"],
            registry=r,
        )
        self.processing = Histogram(
            "leadrouter_processing_seconds",
            "From delivery to ack or dead letter",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=r,
        )
        self.dead_letters = Counter(
            "leadrouter_dead_letters",
            "Messages dead-lettered by this worker, by reason",
            ["reason"],
            registry=r,
        )
        self.events_published = Counter(
            "leadrouter_events_published", "Outbox events confirmed by the broker", registry=r
        )
        self.queued_contacts = Gauge(
            "leadrouter_queued_contacts",
            "Open contacts waiting for an operator (all sources)",
            registry=r,
        )
        self.oldest_queued = Gauge(
            "leadrouter_oldest_queued_seconds",
            "How long the oldest queued contact of each source has waited (0: none queued)",
            ["source"],
            registry=r,
        )
        self.outbox_pending = Gauge(
            "leadrouter_outbox_pending",
            "Events committed but not yet confirmed by the broker",
            registry=r,
        )
        self.ready = Gauge(
            "leadrouter_ready",
            "1 when PostgreSQL and RabbitMQ answer and the worker consumes",
            registry=r,
        )
        self.available_operators = Gauge(
            "leadrouter_available_operators",
            "Operators weighted on the source who take work now: active, online, on shift, "
            "not on leave (whatever their load)",
            ["source"],
            registry=r,
        )
