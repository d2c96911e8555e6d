mod device_blkio;
mod guest;
mod integration {}
