# The analytic prior's SDS call as issue 16's GPU fidelity run makes it (see bench/guidance_sds.py), three sizes
# (the fine one also as float16 traffic).
# The first also profiles its in-process calls (fine-shapes/profile-analytic-b4.txt: where its 16 ms an object go);
# the second sends what a GPU scene sends (float16 images, backgrounds and gradients) and times the codec steps alone,
# so that the gRPC hop (median - server ms) splits into serialisation and transport.
set -x
nvidia-smi --query-gpu=name --format=csv,noheader
common="sds --priors analytic --modes inproc,standalone --batches 4 --device cuda --repeats 10 --threads 3"
OUT=$OUT/fine-shapes bash bench/gpu/run.sh $common --analytic-resolution 512 --analytic-shapes --backgrounds \
  --profile $OUT/fine-shapes | tail -4
OUT=$OUT/fine-shapes-f16 MAGIC3D_WHEELS=/none bash bench/gpu/run.sh $common --analytic-resolution 512 --analytic-shapes \
  --backgrounds --dtype float16 --codec | tail -14
OUT=$OUT/fine-builtin MAGIC3D_WHEELS=/none bash bench/gpu/run.sh $common --analytic-resolution 512 --backgrounds | tail -3
OUT=$OUT/coarse-shapes MAGIC3D_WHEELS=/none bash bench/gpu/run.sh $common --analytic-resolution 64 --analytic-shapes --backgrounds | tail -3
