//! Raft node ids, as every server and tool reads them.

/// A Raft node id: the low 32 bits are the node's *seat* (the `--id` its server was started
/// with), the high bits its *incarnation*: 0 for a seat's first data directory, one more
/// each time the seat comes back with an empty one (see the raft crate's `bootstrap`).
pub type NodeId = u64;

/// The seat of node `id`.
pub fn seat(id: NodeId) -> u64 {
    id & 0xffff_ffff
}

/// The incarnation of node `id` within its seat.
pub fn incarnation(id: NodeId) -> u64 {
    id >> 32
}

/// `id` as people read it: the seat, then `.incarnation` for any but the first.
pub fn display_id(id: NodeId) -> String {
    match incarnation(id) {
        0 => seat(id).to_string(),
        n => format!("{}.{n}", seat(id)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_seats_and_incarnations() {
        let id = (2 << 32) | 7;
        assert_eq!((seat(id), incarnation(id), display_id(id), display_id(7)), (7, 2, "7.2".into(), "7".into()));
    }
}
