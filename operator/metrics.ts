// The operator's Prometheus metrics (prom-client), served on /metrics.
import { Counter, Gauge, Histogram, Registry, collectDefaultMetrics } from "prom-client";

export class OperatorMetrics {
  readonly registry = new Registry();
  readonly reconciles = new Counter({ name: "understudy_operator_reconcile_total", help: "Reconciles by controller and result (success, error)", labelNames: ["controller", "result"], registers: [this.registry] });
  readonly reconcileSeconds = new Histogram({ name: "understudy_operator_reconcile_duration_seconds", help: "Time one reconcile took", labelNames: ["controller"], buckets: [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30], registers: [this.registry] });
  readonly queueDepth = new Gauge({ name: "understudy_operator_workqueue_depth", help: "Keys waiting in the work queue", labelNames: ["controller"], registers: [this.registry] });
  readonly queueWaitSeconds = new Histogram({ name: "understudy_operator_workqueue_queue_duration_seconds", help: "How long a key waited in the queue before a worker took it", labelNames: ["controller"], buckets: [0.001, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 60], registers: [this.registry] });
  readonly agentCalls = new Counter({ name: "understudy_operator_agent_calls_total", help: "Control calls to agents by method and result", labelNames: ["method", "result"], registers: [this.registry] });
  readonly agentCallSeconds = new Histogram({ name: "understudy_operator_agent_call_duration_seconds", help: "Duration of control calls to agents", labelNames: ["method"], buckets: [0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 15], registers: [this.registry] });
  readonly leader = new Gauge({ name: "understudy_operator_leader", help: "1 while this replica is the leader", registers: [this.registry] });
  readonly pairLag = new Gauge({ name: "understudy_pair_lag_seconds", help: "Age of the oldest change not acknowledged by every target", labelNames: ["namespace", "name"], registers: [this.registry] });
  readonly pairQueued = new Gauge({ name: "understudy_pair_queued_bytes", help: "Journaled bytes not yet acknowledged by every target", labelNames: ["namespace", "name"], registers: [this.registry] });
  readonly pairReady = new Gauge({ name: "understudy_pair_ready", help: "1 when the pair's Ready condition is True", labelNames: ["namespace", "name"], registers: [this.registry] });

  constructor() {
    collectDefaultMetrics({ register: this.registry, prefix: "understudy_operator_" });
  }

  forgetPair(namespace: string, name: string): void {
    for (const g of [this.pairLag, this.pairQueued, this.pairReady]) g.remove({ namespace, name });
  }
}
