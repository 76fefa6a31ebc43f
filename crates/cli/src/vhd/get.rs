//! `vhd get`: Get-VHD's properties, as a list or JSON.

use std::path::Path;

use vhdx::open;

pub fn get(path: &Path, json: bool) -> anyhow::Result<()> {
    let img = open::open(path, true)?;
    let i = img.info()?;
    let min = img.minimum_size().ok();
    let path_s = std::fs::canonicalize(path)
        .unwrap_or(path.to_path_buf())
        .display()
        .to_string();
    let parent = i.parent_path.as_ref().map(|p| {
        std::fs::canonicalize(p)
            .unwrap_or(p.clone())
            .display()
            .to_string()
    });
    let v = serde_json::json!({
        "Path": path_s,
        "VhdFormat": i.format.name(),
        "VhdType": i.image_type.name(),
        "FileSize": i.file_size,
        "Size": i.size,
        "MinimumSize": min,
        "LogicalSectorSize": i.logical_sector_size,
        "PhysicalSectorSize": i.physical_sector_size,
        "BlockSize": i.block_size,
        "ParentPath": parent,
        "DiskIdentifier": i.disk_id,
        "FragmentationPercentage": i.fragmentation_percent,
        "Attached": false,
    });
    if json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let keys = [
        "Path",
        "VhdFormat",
        "VhdType",
        "FileSize",
        "Size",
        "MinimumSize",
        "LogicalSectorSize",
        "PhysicalSectorSize",
        "BlockSize",
        "ParentPath",
        "DiskIdentifier",
        "FragmentationPercentage",
        "Attached",
    ];
    for k in keys {
        let s = match &v[k] {
            serde_json::Value::Null => String::new(),
            serde_json::Value::String(s) => s.clone(),
            serde_json::Value::Bool(b) => if *b { "True" } else { "False" }.to_string(),
            other => other.to_string(),
        };
        println!("{k:<23} : {s}");
    }
    Ok(())
}
