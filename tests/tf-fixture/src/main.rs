//! `terraform-provider-capstanfixture`: a small Terraform provider (plugin
//! protocol 6, built on the `tf-provider` crate) that Capstan's tests drive
//! through Capstan's Terraform bridge.
//!
//! See README.md next to Cargo.toml for what each resource does.

mod common;
mod file;
mod provider;
mod read;
mod slow;

fn main() -> anyhow::Result<()> {
    // tf-provider 0.2.2 appends `Backtrace::capture()` to every diagnostic's
    // detail whenever backtraces are enabled (RUST_BACKTRACE=1 is common in
    // test environments). Keep diagnostic details exact: disable library
    // backtraces (panics still honour RUST_BACKTRACE). Done before any thread
    // exists, so setting the variable is sound.
    std::env::set_var("RUST_LIB_BACKTRACE", "0");

    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(tf_provider::serve(
            "capstanfixture",
            provider::FixtureProvider::default(),
        ))
}
