//! Pair-aware packing: an example's prompt is computed once, with its responses
//! (chosen, rejected, negatives) after it in the same row; each response attends
//! to the prompt and to itself only, and its positions continue from the prompt's
//! end as if it were the only response. Several examples share a row (first-fit
//! decreasing by length), each attending only within itself, so a micro-batch
//! costs its real tokens plus the tail of its last rows instead of
//! `sequences × longest sequence`. Log-probabilities equal the unpacked path's
//! (the attention each token sees is the same set of keys at the same relative
//! positions); `tests` checks it to 1e-5 in f32.
//!
//! Only hidden states of positions that predict a response token go through the
//! language-model head, which also saves the head's compute on prompt positions.

use tch::{Device, Kind, Tensor};

use crate::error::{Result, TorchContext};

/// One example in a packed row: its prompt, then its responses in order, each
/// scored as sequence number `.1` of the micro-batch.
#[derive(Debug, Clone)]
pub struct Segment<'a> {
    pub prompt: &'a [u32],
    pub responses: Vec<(&'a [u32], usize)>,
}

impl Segment<'_> {
    pub fn len(&self) -> usize {
        self.prompt.len() + self.responses.iter().map(|(r, _)| r.len()).sum::<usize>()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A micro-batch as packed rows.
#[derive(Debug)]
pub struct PackedBatch {
    /// `[rows, len]` int64.
    pub input_ids: Tensor,
    /// `[rows, len]` int64: each token's position within its own sequence.
    pub positions: Tensor,
    /// `[rows, len, len]` bool: query i may attend key j.
    pub allowed: Tensor,
    /// `[tokens]` int64: flat `row * len + column` of the hidden state that
    /// predicts each scored token.
    pub sources: Tensor,
    /// `[tokens]` int64: the scored tokens.
    pub targets: Tensor,
    /// `[tokens]` int64: `sequence * max_response + index in the response`, the
    /// token's slot in the dense `[sequences, max_response]` layout.
    pub slots: Tensor,
    /// `[tokens]` int64: the sequence each scored token belongs to.
    pub owners: Tensor,
    pub sequences: usize,
    pub max_response: usize,
    pub rows: usize,
    pub row_len: usize,
}

/// Assigns segments to rows of `capacity` tokens (first-fit decreasing; a segment
/// longer than `capacity` gets a row of its own). Returns rows of segment indices.
pub fn bins(lengths: &[usize], capacity: usize) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    order.sort_by(|&a, &b| lengths[b].cmp(&lengths[a]).then(a.cmp(&b)));
    let mut rows: Vec<(usize, Vec<usize>)> = Vec::new();
    for i in order {
        let len = lengths[i];
        match rows.iter_mut().find(|(used, _)| used + len <= capacity) {
            Some((used, members)) => {
                *used += len;
                members.push(i);
            }
            None => rows.push((len, vec![i])),
        }
    }
    rows.into_iter().map(|(_, m)| m).collect()
}

impl PackedBatch {
    /// Packs `segments` (holding sequences `0..sequences`) into rows of up to
    /// `capacity` tokens.
    pub fn new(
        segments: &[Segment<'_>],
        sequences: usize,
        capacity: usize,
        device: Device,
    ) -> Result<Self> {
        let lengths: Vec<usize> = segments.iter().map(Segment::len).collect();
        let rows = bins(&lengths, capacity);
        let row_len = rows
            .iter()
            .map(|r| r.iter().map(|&i| lengths[i]).sum::<usize>())
            .max()
            .unwrap_or(0)
            .max(1);
        let max_response = segments
            .iter()
            .flat_map(|s| s.responses.iter().map(|(r, _)| r.len()))
            .max()
            .unwrap_or(0)
            .max(1);
        let n = rows.len().max(1) * row_len;
        let mut ids = vec![0i64; n];
        let mut pos = vec![0i64; n];
        // Which example a token belongs to (padding: a unique negative id, so it
        // attends to itself only) and which block within it (0: the prompt,
        // k: response k).
        let mut example = vec![0i64; n];
        let mut block = vec![0i64; n];
        for (i, e) in example.iter_mut().enumerate() {
            *e = -(i as i64) - 1;
        }
        let (mut sources, mut targets, mut slots, mut owners) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for (r, members) in rows.iter().enumerate() {
            let mut at = r * row_len;
            for &s in members {
                let seg = &segments[s];
                let p = seg.prompt.len();
                let prompt_start = at;
                for (k, &t) in seg.prompt.iter().enumerate() {
                    ids[at] = i64::from(t);
                    pos[at] = k as i64;
                    example[at] = s as i64;
                    block[at] = 0;
                    at += 1;
                }
                for (b, (resp, seq)) in seg.responses.iter().enumerate() {
                    let start = at;
                    for (k, &t) in resp.iter().enumerate() {
                        ids[at] = i64::from(t);
                        pos[at] = (p + k) as i64;
                        example[at] = s as i64;
                        block[at] = b as i64 + 1;
                        // Token k is predicted by the previous token of its own
                        // sequence: the prompt's last for k = 0 (none without a
                        // prompt, as in the unpacked path).
                        let source = if k > 0 {
                            Some(start + k - 1)
                        } else if p > 0 {
                            Some(prompt_start + p - 1)
                        } else {
                            None
                        };
                        if let Some(src) = source {
                            sources.push(src as i64);
                            targets.push(i64::from(t));
                            slots.push((seq * max_response + k) as i64);
                            owners.push(*seq as i64);
                        }
                        at += 1;
                    }
                }
            }
        }
        let rows_n = rows.len().max(1) as i64;
        let l = row_len as i64;
        let tensor = |v: &[i64], shape: &[i64]| -> Result<Tensor> {
            Tensor::f_from_slice(v)
                .and_then(|t| t.f_view(shape))
                .and_then(|t| t.f_to_device(device))
                .op("building packed batch")
        };
        let example = tensor(&example, &[rows_n, l])?;
        let block = tensor(&block, &[rows_n, l])?;
        let allowed = (|| -> std::result::Result<Tensor, tch::TchError> {
            let idx = Tensor::f_arange(l, (Kind::Int64, device))?;
            let causal = idx
                .f_view([1, 1, l])?
                .f_le_tensor(&idx.f_view([1, l, 1])?)?;
            let same = example
                .f_view([rows_n, l, 1])?
                .f_eq_tensor(&example.f_view([rows_n, 1, l])?)?;
            // Key j is visible from query i when it is the prompt (block 0) or in
            // i's own block.
            let kb = block.f_view([rows_n, 1, l])?;
            let visible = kb
                .f_eq(0)?
                .f_logical_or(&kb.f_eq_tensor(&block.f_view([rows_n, l, 1])?)?)?;
            causal.f_logical_and(&same)?.f_logical_and(&visible)
        })()
        .op("packed attention mask")?;
        let t = sources.len() as i64;
        Ok(PackedBatch {
            input_ids: tensor(&ids, &[rows_n, l])?,
            positions: tensor(&pos, &[rows_n, l])?,
            allowed,
            sources: tensor(&sources, &[t])?,
            targets: tensor(&targets, &[t])?,
            slots: tensor(&slots, &[t])?,
            owners: tensor(&owners, &[t])?,
            sequences,
            max_response,
            rows: rows.len(),
            row_len,
        })
    }

    /// Token positions computed (rows × row length), padding included.
    pub fn computed_tokens(&self) -> usize {
        self.rows * self.row_len
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bins_are_first_fit_decreasing_and_never_split_a_segment() {
        let rows = bins(&[5, 9, 3, 7, 2, 12], 10);
        // 12 alone (too long), 9, 7+3, 5+2.
        assert_eq!(rows, vec![vec![5], vec![1], vec![3, 2], vec![0, 4]]);
        let mut all: Vec<usize> = rows.concat();
        all.sort();
        assert_eq!(all, (0..6).collect::<Vec<_>>());
    }

    #[test]
    fn each_response_sees_its_prompt_and_itself_only() {
        let prompt = [11u32, 12];
        let (a, b) = ([21u32, 22], [31u32]);
        let other = [41u32];
        let segs = vec![
            Segment {
                prompt: &prompt,
                responses: vec![(&a, 0), (&b, 2)],
            },
            Segment {
                prompt: &other,
                responses: vec![(&other, 1)],
            },
        ];
        let p = PackedBatch::new(&segs, 3, 16, Device::Cpu).expect("pack");
        assert_eq!((p.rows, p.row_len), (1, 7));
        let ids = Vec::<i64>::try_from(p.input_ids.view([-1])).expect("ids");
        assert_eq!(ids, vec![11, 12, 21, 22, 31, 41, 41]);
        let pos = Vec::<i64>::try_from(p.positions.view([-1])).expect("pos");
        assert_eq!(pos, vec![0, 1, 2, 3, 2, 0, 1]);
        let allowed = Vec::<bool>::try_from(p.allowed.view([-1])).expect("mask");
        let row = |i: usize| -> Vec<usize> { (0..7).filter(|&j| allowed[i * 7 + j]).collect() };
        assert_eq!(row(3), vec![0, 1, 2, 3], "chosen: prompt + itself");
        assert_eq!(
            row(4),
            vec![0, 1, 4],
            "rejected: prompt + itself, not chosen"
        );
        assert_eq!(row(6), vec![5, 6], "the second example sees only itself");
        // Scored tokens: 21 (from 12), 22 (from 21), 31 (from 12!), 41 (from 41@5).
        let src = Vec::<i64>::try_from(&p.sources).expect("src");
        let tgt = Vec::<i64>::try_from(&p.targets).expect("tgt");
        let own = Vec::<i64>::try_from(&p.owners).expect("own");
        assert_eq!(src, vec![1, 2, 1, 5]);
        assert_eq!(tgt, vec![21, 22, 31, 41]);
        assert_eq!(own, vec![0, 0, 2, 1]);
    }
}
