//! Runs every demo in turn (XOR first) and prints one JSON line per demo.

#[path = "affine.rs"]
mod affine;
#[path = "chat_memory.rs"]
mod chat_memory;
#[path = "cost.rs"]
mod cost;
#[path = "gridworld.rs"]
mod gridworld;
#[path = "lm_params.rs"]
mod lm_params;
#[cfg(feature = "llm")]
#[path = "prompt_qa.rs"]
mod prompt_qa;
#[path = "xor.rs"]
mod xor;
#[path = "xor_single_layer.rs"]
mod xor_single_layer;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    println!("{}", xor::run().await?);
    println!("{}", xor_single_layer::run().await?);
    println!("{}", affine::run().await?);
    println!("{}", lm_params::run().await?);
    println!("{}", gridworld::run().await?);
    println!("{}", chat_memory::run().await?);
    println!("{}", cost::run().await?);
    #[cfg(feature = "llm")]
    println!("{}", prompt_qa::run().await?);
    Ok(())
}
