//! Crash test of the query side (exactly-once effect on views: README, Guarantees): the query server is `kill -9`ed at random
//! moments while events flow. Right after each restart (cut off from NATS, so it cannot
//! move on) its views equal the fold of events 1..checkpoint; once caught up they equal
//! the fold of the whole log. Counters such as order_count are never double-counted.
//!
//! Rounds: `SHOP_CRASH_ROUNDS` (default 20).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rand::{Rng, SeedableRng};
use shop_tests::{log_position, pb, read_whole_log, wait_applied, Stack};

use crate::queries::random_command;
use shop_tests::model::{assert_views_equal, fetch_all, Views};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_at_random_moments_leaves_views_equal_to_a_fold_up_to_the_checkpoint() {
    let rounds: usize = std::env::var("SHOP_CRASH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let mut stack = Stack::start().await;
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let mut c = stack.command.commands().await;
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut rng = rand::rngs::StdRng::seed_from_u64(5);
            let mut sent = 0u64;
            while !stop.load(Ordering::Relaxed) {
                random_command(&mut c, &mut rng).await;
                sent += 1;
            }
            sent
        })
    };
    let mut rng = rand::rngs::StdRng::seed_from_u64(6);
    let mut checkpoints = Vec::new();
    let real_nats = stack.nats.url();
    for round in 0..rounds {
        tokio::time::sleep(Duration::from_millis(rng.random_range(30..300))).await;
        stack.query.kill9();

        // Restart cut off from NATS: what it serves is exactly what it had committed.
        stack.query.set_nats_url("nats://127.0.0.1:1");
        stack.query.spawn_until_listening();
        let mut q = stack.query.queries().await;
        let checkpoint = q
            .get_status(pb::GetStatusRequest {})
            .await
            .expect("status")
            .into_inner()
            .applied_position;
        let views = fetch_all(&mut q, 0).await;
        let events = read_whole_log(&mut stack.command.log_reader().await).await;
        assert!(checkpoint as usize <= events.len());
        let expected = Views::fold(&events[..checkpoint as usize]);
        assert_views_equal(
            &views,
            &expected,
            &format!("round {round}, checkpoint {checkpoint}"),
        );
        checkpoints.push(checkpoint);

        stack.query.kill9();
        stack.query.set_nats_url(&real_nats);
        stack.query.restart().await;
    }
    stop.store(true, Ordering::Relaxed);
    let sent = writer.await.expect("writer");

    let position = log_position(&mut stack.command.log_reader().await).await;
    let mut q = stack.query.queries().await;
    wait_applied(&q, position, Duration::from_secs(30)).await;
    let events = read_whole_log(&mut stack.command.log_reader().await).await;
    assert_views_equal(
        &fetch_all(&mut q, position).await,
        &Views::fold(&events),
        "caught up",
    );
    // The kills landed at different points of the stream, not all at the same one.
    checkpoints.dedup();
    assert!(
        checkpoints.len() > rounds / 2,
        "checkpoints {checkpoints:?} after {sent} commands"
    );
}
