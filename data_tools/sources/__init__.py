"""Registry of source converters: name -> (plan function, one-line description for --help)."""
from __future__ import annotations

from data_tools.sources import classic, md_originals, md_records

SOURCES = {
    "md_tfrecords": (md_records.plan_md_tfrecords,
                     "Meta-Dataset records folder (<label>.tfrecords + dataset_spec.json)"),
    "pmf_h5": (md_records.plan_pmf_h5, "P>M>F per-class h5 files (<label>.h5 + dataset_spec.json)"),
    "ilsvrc_2012": (md_originals.plan_ilsvrc_2012,
                    "ImageNet train/ synset folders; needs --md-spec (DAG split); drops MD's duplicates"),
    "omniglot": (md_originals.plan_omniglot, "Omniglot images_background + images_evaluation"),
    "aircraft": (md_originals.plan_aircraft, "fgvc-aircraft-2013b (box crops)"),
    "cu_birds": (md_originals.plan_cu_birds, "CUB_200_2011 (classes.txt + images/)"),
    "dtd": (md_originals.plan_dtd, "Describable Textures (images/<class>/)"),
    "quickdraw": (md_originals.plan_quickdraw, "QuickDraw <class>.npy bitmaps"),
    "fungi": (md_originals.plan_fungi, "FGVCx fungi (train.json + val.json + images)"),
    "vgg_flower": (md_originals.plan_vgg_flower, "Oxford flowers 102 (jpg/ + imagelabels.mat)"),
    "traffic_sign": (md_originals.plan_traffic_sign, "GTSRB (Final_Training/Images)"),
    "mscoco": (md_originals.plan_mscoco, "MSCOCO train2017 + instances_train2017.json (box crops)"),
    "cifar10": (classic.plan_cifar10, "CIFAR-10 python batches (test set, all classes test)"),
    "cifar100": (classic.plan_cifar100, "CIFAR-100 python batches (test set, all classes test)"),
    "mnist": (classic.plan_mnist, "MNIST idx files (t10k set, all classes test)"),
    "imagefolder": (classic.plan_imagefolder, "any class-per-folder tree (--splits for a seeded class split)"),
}
