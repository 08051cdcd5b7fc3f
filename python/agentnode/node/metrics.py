"""Prometheus metrics of the node, read from its live state at each scrape."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from agentnode.node.runner import Node

__all__ = ["NodeMetrics"]


class _NodeCollector(Collector):
    def __init__(self, node: Node) -> None:
        self._node = node

    def collect(self) -> Iterator[Metric]:
        node = self._node
        queued = GaugeMetricFamily(
            "agentnode_tasks_queued", "Queued tasks", labels=["priority", "tenant"]
        )
        for (cls, tenant), n in sorted(node.manager.queue_depth().items()):
            queued.add_metric([cls, tenant], n)
        yield queued
        running = GaugeMetricFamily("agentnode_tasks_running", "Running tasks", labels=["tenant"])
        for tenant, n in sorted(Counter(r.task.spec.tenant for r in node.running.values()).items()):
            running.add_metric([tenant], n)
        yield running
        outcomes = CounterMetricFamily(
            "agentnode_task_outcomes", "Ended task attempts by outcome", labels=["outcome"]
        )
        for outcome, n in sorted(node.outcomes.items()):
            outcomes.add_metric([outcome], n)
        yield outcomes
        cpu = GaugeMetricFamily(
            "agentnode_task_cpu_seconds", "CPU time of running tasks", labels=["task", "tenant"]
        )
        mem = GaugeMetricFamily(
            "agentnode_task_memory_bytes", "Memory of running tasks", labels=["task", "tenant"]
        )
        for task_id, r in list(node.running.items()):
            if r.proc.result is not None:
                continue
            s = r.proc.stats()
            cpu.add_metric([task_id, r.task.spec.tenant], s.cpu_user_s + s.cpu_system_s)
            mem.add_metric([task_id, r.task.spec.tenant], s.memory_current)
        yield cpu
        yield mem
        free_cpu, free_mem = node.free()
        yield GaugeMetricFamily("agentnode_free_cpu_millis", "Unrequested CPU", value=free_cpu)
        yield GaugeMetricFamily("agentnode_free_memory_bytes", "Unrequested memory", value=free_mem)
        yield GaugeMetricFamily(
            "agentnode_disk_full",
            "1 while the task store cannot write for want of disk space",
            value=int(node.manager.store.disk_full is not None),
        )
        yield GaugeMetricFamily(
            "agentnode_scheduler_healthy",
            "1 while the scheduling loop passes; 0 while it fails (see /healthz)",
            value=int(node.scheduler_health() == "ok"),
        )


class NodeMetrics:
    """The node's registry: live gauges plus the queue wait-time histogram."""

    def __init__(self, node: Node) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_NodeCollector(node))
        self.wait = Histogram(
            "agentnode_task_wait_seconds",
            "Time from submit (or retry) to start",
            ["priority"],
            registry=self.registry,
            buckets=(0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 30, 120, 600, 3600),
        )
        node.on_start = lambda task, waited: self.wait.labels(task.spec.cls).observe(waited)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
