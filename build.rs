// `sqlx::migrate!` (src/app.rs) embeds migrations/ at compile time, but cargo does not know that
// directory is an input: a build after adding a migration would otherwise embed the old list.
fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
