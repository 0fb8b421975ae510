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

/// The `learners` of a group that hold none of `seats` (the seats of the servers a fleet
/// runs): left by an earlier run, or whose removal failed. A learner of a held seat is a
/// new incarnation taking that seat's place, and stays.
pub fn strays(learners: impl IntoIterator<Item = NodeId>, seats: &[u64]) -> Vec<NodeId> {
    learners.into_iter().filter(|id| !seats.contains(&seat(*id))).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_seats_and_incarnations() {
        let id = (2 << 32) | 7;
        assert_eq!((seat(id), incarnation(id), display_id(id), display_id(7)), (7, 2, "7.2".into(), "7".into()));
    }

    #[test]
    fn strays_are_learners_of_no_held_seat() {
        assert_eq!(strays([101, (1 << 32) | 2, 103], &[1, 2, 3, 103]), vec![101]);
    }
}
