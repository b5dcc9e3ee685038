//! The manifest lists: one name (`<IMAGE>:<tag>`) for every platform's image, so that a node pulls
//! its own.

use anyhow::{Context as _, Result};

use super::platform::Platform;
use super::rootfs::{self, buildah};
use crate::util::output;

/// Points `list` at a new manifest list of `platforms`' images (their per-platform tags), replacing
/// whatever it named before.
pub fn publish(list: &str, platforms: &[Platform]) -> Result<()> {
    // `buildah rmi` of a list's name resolves to the list's image for this machine and removes that:
    // a list must be removed as a list.
    if output("buildah", &["manifest", "exists", list]).is_some() {
        buildah(&["manifest", "rm", list])?;
    } else if let Some(id) = rootfs::image_id(list) {
        // A plain image under that name (what an older `cargo xtask image` tagged): untag it, and
        // remove it once nothing names it.
        buildah(&["rmi", list]).with_context(|| format!("untagging {list}"))?;
        rootfs::remove_if_dangling(&id);
    }
    buildah(&["manifest", "create", list])?;
    for platform in platforms {
        let image = format!("containers-storage:{}", rootfs::tag(*platform));
        buildah(&["manifest", "add", list, &image])?;
    }
    Ok(())
}
