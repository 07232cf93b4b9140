//! The commands that use the library: they are built on `config`, `store`, `kafka`,
//! `codec` and `app`, and nothing in the library uses them.

pub mod dead_letters;
pub mod reference;
