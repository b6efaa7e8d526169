//! Who spends what where: a month of calls to three paid scraping endpoints and one LLM,
//! recorded in a ledger with their callers, labels and customers, then the cost report by
//! caller and by endpoint. Offline: the calls are simulated, the accounting is real.
//!
//! The ledger is left at `target/cost-demo.sqlite` so the CLI can read it:
//! `hyperfunc cost report --store target/cost-demo.sqlite --by endpoint,caller --chart spend.svg`.
//! Prints one JSON line.

use hyperfunc::tune::{micros_to_usd, CostDim, Ledger, Meter, MeterPrice};
use rand::{Rng, SeedableRng};
use rand_xoshiro::Xoshiro256PlusPlus;

pub async fn run() -> anyhow::Result<serde_json::Value> {
    let path = std::path::Path::new("target").join("cost-demo.sqlite");
    std::fs::create_dir_all("target")?;
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
    }
    let ledger = Ledger::open(&path)?;
    let unlocker = Meter::new(&ledger, "unlocker", MeterPrice::per_call_usd(0.0015)?);
    let browser = Meter::new(&ledger, "browser", MeterPrice::per_call_usd(0.004)?);
    let pdf = Meter::new(
        &ledger,
        "pdf-to-text",
        MeterPrice::per_unit_usd("page", 0.0004)?,
    );
    let llm = Meter::new(&ledger, "llm", MeterPrice::FromResponse);
    let mut rng = Xoshiro256PlusPlus::seed_from_u64(7);
    let customers = ["acme", "globex", "initech"];
    let mut calls = 0;
    for _day in 0..30 {
        // The price crawler retries every blocked site through the unlocker.
        for _ in 0..400 {
            let c = customers[rng.random_range(0..3)];
            unlocker
                .charge()
                .call_site("crawler/prices.rs:88")
                .label("fetch-price")
                .user(c)
                .record()?;
            calls += 1;
        }
        // The news crawler renders pages in a browser only when the direct fetch failed.
        for _ in 0..60 {
            browser
                .charge()
                .call_site("crawler/news.rs:41")
                .label("fetch-article")
                .user(customers[rng.random_range(0..3)])
                .record()?;
            calls += 1;
        }
        // Invoices go through PDF to text, priced per page.
        for _ in 0..40 {
            pdf.charge()
                .call_site("billing/invoices.rs:17")
                .label("parse-invoice")
                .user("initech")
                .units(f64::from(rng.random_range(1..12u32)))
                .record()?;
            calls += 1;
        }
        // Summaries: the LLM's price comes from each response.
        for _ in 0..150 {
            llm.charge()
                .call_site("reports/summary.rs:63")
                .label("summarise")
                .model("gpt-4o-mini")
                .user(customers[rng.random_range(0..3)])
                .usd(rng.random_range(0.0002..0.0009))
                .record()?;
            calls += 1;
        }
    }
    let by_caller = ledger.cost_report(&[CostDim::Caller], None)?;
    let by_endpoint = ledger.cost_report(&[CostDim::Endpoint], None)?;
    eprintln!("{}", by_caller.to_table());
    eprintln!("{}", by_endpoint.to_table());
    let top = &by_caller.rows[0];
    Ok(serde_json::json!({
        "demo": "cost",
        "calls": calls,
        "total_usd": micros_to_usd(by_caller.total_micros),
        "top_caller": top.key[0],
        "top_caller_usd": micros_to_usd(top.micros),
        "ledger": path.display().to_string(),
    }))
}

#[allow(dead_code)]
#[tokio::main]
async fn main() -> anyhow::Result<()> {
    println!("{}", run().await?);
    Ok(())
}
