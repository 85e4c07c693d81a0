//! Fit a PNG under a byte budget for MCP image content: decode, and while the encoded image is too large,
//! halve its size (box filter) and re-encode. Pure Rust, CPU only; the MCP server runs it on a blocking
//! thread.

use std::io::Cursor;

/// The result of fitting: PNG bytes and their size in pixels.
#[derive(Debug)]
pub struct Fitted {
    pub png: Vec<u8>,
    pub width: u32,
    pub height: u32,
    /// The original size, when the image had to be scaled down.
    pub scaled_from: Option<(u32, u32)>,
}

struct Raw {
    width: u32,
    height: u32,
    /// Samples per pixel: 1 (gray), 2 (gray+alpha), 3 (RGB) or 4 (RGBA), 8 bits each.
    channels: usize,
    pixels: Vec<u8>,
}

fn decode(png_bytes: &[u8]) -> Result<Raw, String> {
    let mut decoder = png::Decoder::new(Cursor::new(png_bytes));
    decoder.set_transformations(png::Transformations::normalize_to_color8());
    let mut reader = decoder
        .read_info()
        .map_err(|e| format!("not a readable PNG: {e}"))?;
    let size = reader
        .output_buffer_size()
        .ok_or_else(|| "PNG too large to decode".to_string())?;
    let mut pixels = vec![0; size];
    let info = reader
        .next_frame(&mut pixels)
        .map_err(|e| format!("not a readable PNG: {e}"))?;
    pixels.truncate(info.buffer_size());
    let channels = match info.color_type {
        png::ColorType::Grayscale => 1,
        png::ColorType::GrayscaleAlpha => 2,
        png::ColorType::Rgb => 3,
        png::ColorType::Rgba => 4,
        png::ColorType::Indexed => return Err("indexed PNG was not expanded".into()),
    };
    // Rows may be padded; keep exactly width * channels bytes per row.
    let row = info.width as usize * channels;
    if info.line_size != row {
        let mut packed = Vec::with_capacity(row * info.height as usize);
        for y in 0..info.height as usize {
            packed.extend_from_slice(&pixels[y * info.line_size..y * info.line_size + row]);
        }
        pixels = packed;
    }
    Ok(Raw {
        width: info.width,
        height: info.height,
        channels,
        pixels,
    })
}

fn encode(raw: &Raw) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut out, raw.width, raw.height);
        enc.set_color(match raw.channels {
            1 => png::ColorType::Grayscale,
            2 => png::ColorType::GrayscaleAlpha,
            3 => png::ColorType::Rgb,
            _ => png::ColorType::Rgba,
        });
        enc.set_depth(png::BitDepth::Eight);
        enc.set_compression(png::Compression::High);
        let mut w = enc.write_header().map_err(|e| e.to_string())?;
        w.write_image_data(&raw.pixels).map_err(|e| e.to_string())?;
        w.finish().map_err(|e| e.to_string())?;
    }
    Ok(out)
}

/// Halve both sides (at least 1 pixel), averaging each 2x2 block.
fn halve(raw: &Raw) -> Raw {
    let (w, h, c) = (raw.width as usize, raw.height as usize, raw.channels);
    let (nw, nh) = ((w / 2).max(1), (h / 2).max(1));
    let mut pixels = vec![0u8; nw * nh * c];
    for y in 0..nh {
        for x in 0..nw {
            for k in 0..c {
                let mut sum = 0u32;
                let mut n = 0u32;
                for (dy, dx) in [(0, 0), (0, 1), (1, 0), (1, 1)] {
                    let (sy, sx) = (2 * y + dy, 2 * x + dx);
                    if sy < h && sx < w {
                        sum += u32::from(raw.pixels[(sy * w + sx) * c + k]);
                        n += 1;
                    }
                }
                pixels[(y * nw + x) * c + k] = ((sum + n / 2) / n.max(1)) as u8;
            }
        }
    }
    Raw {
        width: nw as u32,
        height: nh as u32,
        channels: c,
        pixels,
    }
}

/// Return `png_bytes` unchanged when they fit in `budget`; else scale down until they do.
pub fn fit_png(png_bytes: Vec<u8>, budget: usize) -> Result<Fitted, String> {
    let mut raw = decode(&png_bytes)?;
    let original = (raw.width, raw.height);
    if png_bytes.len() <= budget {
        return Ok(Fitted {
            png: png_bytes,
            width: raw.width,
            height: raw.height,
            scaled_from: None,
        });
    }
    loop {
        if raw.width <= 1 && raw.height <= 1 {
            return Err(format!("the image cannot be made to fit in {budget} bytes"));
        }
        raw = halve(&raw);
        let png = encode(&raw)?;
        if png.len() <= budget {
            return Ok(Fitted {
                png,
                width: raw.width,
                height: raw.height,
                scaled_from: Some(original),
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn noise_png(w: u32, h: u32) -> Vec<u8> {
        // Incompressible-ish content so the PNG is large.
        let mut x: u32 = 12345;
        let pixels = (0..w * h * 3)
            .map(|_| {
                x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
                (x >> 16) as u8
            })
            .collect();
        encode(&Raw {
            width: w,
            height: h,
            channels: 3,
            pixels,
        })
        .unwrap_or_default()
    }

    #[test]
    fn small_images_pass_unchanged_large_ones_shrink_under_budget() {
        let png = noise_png(64, 48);
        let f = fit_png(png.clone(), png.len()).unwrap();
        assert_eq!(f.png, png);
        assert_eq!((f.width, f.height, f.scaled_from), (64, 48, None));

        let png = noise_png(400, 300);
        let budget = png.len() / 3;
        let f = fit_png(png, budget).unwrap();
        assert!(f.png.len() <= budget);
        assert_eq!(f.scaled_from, Some((400, 300)));
        assert!(
            f.width <= 200 && f.width * 3 == f.height * 4,
            "{}x{}",
            f.width,
            f.height
        );
        let again = decode(&f.png).unwrap();
        assert_eq!((again.width, again.height), (f.width, f.height));
    }

    #[test]
    fn garbage_is_an_error() {
        assert!(fit_png(b"not a png".to_vec(), 10).is_err());
    }
}
