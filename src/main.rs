//! The `vizor` command.

fn main() {
    println!("vizor {}", env!("CARGO_PKG_VERSION"));
}
