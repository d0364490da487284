//! The partitioned design of `docs/scaling.md`, simulated deterministically: two
//! partitions (tenants), each with its own writer deciding with the real domain
//! (`domain::decide` over a fold of its own events) and its own log with its own
//! positions, and one query side folding both logs with the real projections in many
//! interleavings (each partition's order kept). What the design claims, checked:
//! - the views do not depend on the interleaving: every one ends equal to the fold of
//!   partition 1 followed by partition 2;
//! - a read-your-writes token is a position per partition: whenever the query side has
//!   applied partition p up to a command's position, that command's effect is visible,
//!   however far the other partition is;
//! - a command cannot span partitions: a tenant's writer refuses an order for another
//!   tenant's product (it does not know it), so each partition keeps its invariants alone.

use std::collections::HashMap;

use command_server::domain::testing::{create_product, place, register, Memory};
use command_server::domain::{decide, Command, DomainError};
use query_server::projections::{apply, MemoryViews, ReadViews};
use rand::{Rng, SeedableRng};
use shop_shared::events::{event_type, stream_of};
use shop_tests::pb;

/// One partition: its writer's state and its log (positions from 1).
struct Partition {
    name: &'static str,
    state: Memory,
    log: Vec<pb::EventEnvelope>,
    versions: HashMap<String, u64>,
}

impl Partition {
    fn new(name: &'static str) -> Self {
        Partition {
            name,
            state: Memory::default(),
            log: Vec::new(),
            versions: HashMap::new(),
        }
    }

    /// Decides and appends a command; the position of its last event.
    fn run(&mut self, command: &Command) -> Result<u64, DomainError> {
        let events = decide(command, &self.state)?;
        for event in events {
            self.state.apply(&event);
            let stream = stream_of(&event).to_string();
            let version = self.versions.entry(stream.clone()).or_default();
            *version += 1;
            let position = self.log.len() as u64 + 1;
            self.log.push(pb::EventEnvelope {
                event_id: format!("{}-e{position}", self.name),
                position,
                stream_id: stream,
                stream_version: *version,
                event_type: event_type(&event).to_string(),
                command_id: format!("{}-{position}", self.name),
                event: Some(pb::Event { kind: Some(event) }),
                ..Default::default()
            });
        }
        Ok(self.log.len() as u64)
    }
}

/// A tenant's workload: customers, products, orders (ids carry the tenant).
fn workload(p: &mut Partition, rng: &mut rand::rngs::StdRng) -> Vec<(u64, String)> {
    let t = p.name;
    let mut orders = Vec::new();
    for i in 0..4 {
        p.run(&register(&format!("{t}-c{i}"), &format!("c{i}@{t}.test")))
            .expect("register");
        p.run(&create_product(&format!("{t}-p{i}"), 100 + i, 50))
            .expect("product");
    }
    for n in 0..40 {
        let customer = format!("{t}-c{}", rng.random_range(0..4));
        let sku = format!("{t}-p{}", rng.random_range(0..4));
        let order = format!("{t}-o{n}");
        if let Ok(position) = p.run(&place(&order, &customer, &[(&sku, rng.random_range(1..4))])) {
            orders.push((position, order));
        }
    }
    orders
}

#[test]
fn two_partitions_merge_in_any_order_and_read_your_writes_per_partition() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(8);
    let mut p1 = Partition::new("t1");
    let mut p2 = Partition::new("t2");
    let orders = [workload(&mut p1, &mut rng), workload(&mut p2, &mut rng)];
    assert!(orders.iter().all(|o| o.len() > 20), "orders were placed");

    // A command spanning partitions is refused by the writer of its own.
    let refused = p1.run(&place("t1-x", "t1-c0", &[("t2-p0", 1)]));
    assert!(
        matches!(refused, Err(DomainError::ProductNotFound(_))),
        "{refused:?}"
    );

    let reference = MemoryViews::fold(p1.log.iter().chain(&p2.log));
    let logs = [&p1.log, &p2.log];
    for seed in 0..200u64 {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut views = MemoryViews::default();
        // Applied position per partition: the query side's read-your-writes state.
        let mut applied = [0usize; 2];
        while applied[0] < logs[0].len() || applied[1] < logs[1].len() {
            let p = match (applied[0] < logs[0].len(), applied[1] < logs[1].len()) {
                (true, true) => usize::from(rng.random_bool(0.5)),
                (true, false) => 0,
                _ => 1,
            };
            // A batch of 1–8 events of partition p, as a consumer of its stream takes it.
            let take = rng.random_range(1..=8).min(logs[p].len() - applied[p]);
            for e in &logs[p][applied[p]..applied[p] + take] {
                apply(&mut views, e);
            }
            let before = applied[p] as u64;
            applied[p] += take;
            // Every order whose token {p: position} this batch satisfied is visible (and
            // stays so: orders are never removed).
            for (position, order) in &orders[p] {
                if *position > before && *position <= applied[p] as u64 {
                    assert!(
                        views.get::<pb::Order>(order).is_some(),
                        "seed {seed}: {order} (partition {p}, position {position}) not visible at applied {applied:?}"
                    );
                }
            }
        }
        assert_eq!(
            views, reference,
            "seed {seed}: the merge depends on the interleaving"
        );
    }
}
