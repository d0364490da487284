//! Queries: GetOrder and ListOrders at each concurrency next to an echo GetOrder.

use std::sync::Arc;

use super::Stack;
use crate::report::{QueryPoint, Results};
use crate::workload::{self, QueryKind};
use crate::{load, say, Args};

pub async fn run(
    stack: &Stack,
    args: &Args,
    sweep: &[usize],
    echo: &str,
    orders: Vec<String>,
    results: &mut Results,
) -> anyhow::Result<()> {
    let query = &stack.query;
    let catalog = stack.catalog;
    let orders = Arc::new(if orders.is_empty() {
        vec!["none".to_string()]
    } else {
        orders
    });
    for &clients in sweep {
        let l = load(clients, args);
        let echo_run = workload::run_echo(&echo.to_string().into(), true, &l).await?;
        let get = workload::run_queries(
            &query.endpoint().into(),
            QueryKind::GetOrder,
            orders.clone(),
            catalog,
            &l,
        )
        .await?;
        let list = workload::run_queries(
            &query.endpoint().into(),
            QueryKind::ListOrders,
            orders.clone(),
            catalog,
            &l,
        )
        .await?;
        say(format!(
            "queries x{clients}: GetOrder {:.0}/s (echo {:.0}/s), ListOrders {:.0}/s",
            get.per_second, echo_run.per_second, list.per_second
        ));
        results.queries.push(QueryPoint {
            ratio_to_echo: get.per_second / echo_run.per_second.max(1e-9),
            get_order: get,
            list_orders: list,
            echo: echo_run,
        });
    }

    Ok(())
}
